"""Quantize once: quantized weights cached per checkpoint revision, mode and kernel, loaded without ever
materialising the bf16 weights (meta-device model, `load_state_dict(assign=True)`).

An entry is a `.bin` file holding every tensor of the state dict back to back, plus a `.json` record
(key, source, layout, config, tensor table, size, CRC-32 per 64 MB chunk). Loading reads what decoding
streams every token straight into one buffer on 2 MB pages (`_hugepage_view`), and memory-maps the
input embedding (a lookup touches a few of its rows) and any layer the caller names (`mapped`: the guard's
output layer, read in full only at its first start). Every byte is checked before use: a CRC-32
finds a flipped bit or a torn write and runs at ~4 GB/s here (SHA-256: 1.8), which matters at start-up.
An entry that is missing, stale (another key), truncated, altered or does not fit the model is rebuilt,
never trusted blindly. The read can start before torch is imported (`prefetch`). A GGUF file's tokenizer
is converted once and kept the same way (`cached_tokenizer`).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import mmap
import os
import shutil
import threading
import time
import zlib
from concurrent.futures import Future
from pathlib import Path

from model.host import app_cache_folder

log = logging.getLogger(__name__)

FORMAT = 8  # 4: records name their checkpoint (prefetch, dropping stale entries); 5: one weight buffer per QLinear;
# 6: the native kernel is named "native" (one packed layout for every variant); 7: `mapped` layers after the arena;
# 8: int4's output layer is a ShortlistHead
TOKENIZER_FORMAT = 3
CHUNK = 64 << 20
ALIGN = 64
ROTARY_KEY = "__rotary_inv_freq__"  # GGUF checkpoints carry rope factors that live in a non-saved buffer
HUGE_PAGE = 2 << 20


def _fingerprint(source) -> str:
    """What identifies the weights: the HF snapshot hash, else the weight files' names, sizes, mtimes."""
    if source.revision:
        return source.revision
    files = [source.path] if source.path.is_file() else sorted(
        p for p in source.path.iterdir() if p.suffix in (".safetensors", ".pth", ".gguf", ".json", ".bin"))
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _checkpoint(source) -> str:
    return f"{source.kind}|{source.path}"


def _about(source, mode: str) -> dict:
    """What a cache record says of its entry's checkpoint and mode (prefetch and `_drop_stale` match on it)."""
    return {"source": _checkpoint(source), "fingerprint": _fingerprint(source), "mode": mode}


def cache_key(source, mode: str, dtype, kernel: str = "torch") -> str:
    import torch

    ident = f"{FORMAT}|{_checkpoint(source)}|{_fingerprint(source)}|{mode}|{kernel}|{dtype}|{torch.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def cached_tokenizer(source, convert):
    """The tokenizer `convert()` builds from `source` (a GGUF file: reading its vocabulary in Python takes
    ~4 s for SmolLM2's 49k tokens), saved once in the app's cache folder, keyed by the file and the
    transformers version, and loaded from there (~0.3 s) while every saved file's CRC-32 matches its record."""
    import transformers
    from transformers import AutoTokenizer

    ident = f"{TOKENIZER_FORMAT}|tokenizer|{source.path}|{_fingerprint(source)}|{transformers.__version__}"
    folder = app_cache_folder() / "tokenizers" / hashlib.sha256(ident.encode()).hexdigest()[:32]
    record = folder.with_suffix(".json")
    try:
        crcs = json.loads(record.read_text())
        if crcs and all(zlib.crc32((folder / name).read_bytes()) == crc for name, crc in crcs.items()):
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    tokenizer = convert()
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    try:
        record.unlink(missing_ok=True)  # no record names a half-replaced folder
        tokenizer.save_pretrained(tmp)
        crcs = {p.name: zlib.crc32(p.read_bytes()) for p in tmp.iterdir()}
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        tmp_record = record.with_suffix(f".tmp{os.getpid()}")
        tmp_record.write_text(json.dumps(crcs))
        tmp_record.replace(record)
    except OSError as e:  # a full disk or a read-only cache: convert again next time
        log.warning("could not keep the converted tokenizer in %s: %s", folder, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def load_quantized(source, mode: str, *, dtype, cache_folder: Path | None, build, alongside=None, progress=None,
                   prefetched: Prefetch | None = None, mapped: tuple[str, ...] = ()):
    """(the quantized model, what `alongside()` returned). The model comes from the cache, or is built with
    `build()` (bf16 on CPU), quantized, stored and read back (so its weights sit on huge pages either way).
    `alongside` (loading the tokenizer, say) runs in this thread while a cache hit's weights stream in.
    `prefetched` (see `prefetch`) is that read already under way; it is cancelled if it read another entry.
    `progress(text)` hears when the model has to be built (a first start: seconds to a minute). `mapped`: names
    of modules (e.g. "lm_head") stored after the arena with the input embedding, memory-mapped at load."""
    from model.quant import kernel, quantize_model

    kernel_name = kernel()
    folder = quantized_folder(cache_folder)
    key = cache_key(source, mode, dtype, kernel_name)
    weights, record = folder / f"{key}.bin", folder / f"{key}.json"
    meta = _record(record, key)
    if prefetched is not None and (prefetched.weights, prefetched.meta) != (weights, meta):
        prefetched.cancel()
        prefetched = None
    reading = prefetched or (Prefetch(weights, meta) if meta else None)
    extra = alongside() if alongside else None
    model = _from_cache(meta, reading, dtype) if reading else None
    if model is not None:
        model.quant_cache = "hit"
        return model, extra
    name = Path(source.name).name
    if progress:
        progress(f"Reading {name} to quantize it to {mode} (first start only)…")
    model = build()
    last = [0.0]

    def layers(done: int, total: int) -> None:  # at most a line a second: the status bar shows each
        if progress and time.monotonic() - last[0] >= 1.0:
            last[0] = time.monotonic()
            progress(f"Quantizing {name} to {mode}: {done}/{total} layers (first start only)…")

    layout = quantize_model(model, mode, kernel_name, progress=layers)
    about = {**_about(source, mode), "kernel": kernel_name, "dtype": str(dtype)}
    try:
        _store(model, layout, about, key, weights, record, mapped)
        _drop_stale(folder, about, key)
    except OSError as e:  # a full disk or a read-only cache: run from memory this time
        log.warning("could not store the quantized model in %s: %s", folder, e)
        model.quant_cache = "built"
        return model, extra
    del model
    meta = _record(record, key)
    model = _from_cache(meta, Prefetch(weights, meta), dtype) if meta else None
    if model is None:
        raise OSError(f"the quantized model just written to {weights} does not read back; is the disk failing?")
    model.quant_cache = "built"
    return model, extra


def quantized_folder(cache_folder=None) -> Path:
    return Path(cache_folder) if cache_folder else app_cache_folder() / "quantized"


def prefetch(source, mode: str, cache_folder=None) -> Prefetch | None:
    """Start reading the entry `load_quantized` will most likely want before torch and transformers are
    imported: ~3 s of single-threaded imports that the read (0.5-2 s for the 1B shape in int4 here,
    mostly faulting in fresh memory) can overlap on another core. The guess is the newest entry of this
    checkpoint in `mode` ("auto": int4); None when there is none. `load_quantized` uses the read only if
    it is the entry its key names, with every chunk's CRC-32 matching the record."""
    want = _about(source, "int4" if mode == "auto" else mode)
    found = [(mtime, record, meta) for record, meta, mtime in _records(quantized_folder(cache_folder))
             if meta.get("format") == FORMAT and all(meta.get(k) == v for k, v in want.items())]
    best = max(found, key=lambda f: f[0], default=None)
    return Prefetch(best[1].with_suffix(".bin"), best[2]) if best else None


class Prefetch:
    """A cache entry's weights being read and verified on a thread of their own (`_read_verified`):
    `result` is a Future of the huge-page buffer, or of None when the entry cannot be trusted."""

    def __init__(self, weights: Path, meta: dict):
        self.weights, self.meta = weights, meta
        self.cancelled = threading.Event()
        self.result: Future = Future()
        threading.Thread(target=self._run, name="llama-chat-read-weights", daemon=True).start()

    def _run(self) -> None:
        try:
            self.result.set_result(_read_verified(self.weights, self.meta, self.cancelled))
        except BaseException as e:  # noqa: BLE001  (the loading thread re-raises it)
            self.result.set_exception(e)

    def cancel(self) -> None:
        """Stop at the next chunk; the buffer is freed once nothing refers to it."""
        self.cancelled.set()


def _record(record: Path, key: str) -> dict | None:
    try:
        meta = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("key") == key else None


def _state(model) -> dict:
    state = dict(model.state_dict())
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is not None:
        state[ROTARY_KEY] = rotary.inv_freq
    return state


def _store(model, layout, about: dict, key, weights: Path, record: Path, mapped: tuple[str, ...] = ()) -> None:
    """Write the state dict: first what decoding streams every token (read into huge pages at load), then
    the `mapped` modules and the input embedding (memory-mapped at load: a token lookup touches a few rows
    of its 0.5 GB)."""
    import torch

    embedding = model.get_input_embeddings().weight.data_ptr()
    state = _state(model)

    def after_arena(name: str) -> bool:
        return state[name].data_ptr() == embedding or name.startswith(tuple(f"{m}." for m in mapped))

    order = sorted(state, key=after_arena)  # the arena first
    weights.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = weights.with_suffix(f".tmp{os.getpid()}")
    table, arena_bytes = [], None
    regions = [_ChunkCRC(), _ChunkCRC()]  # the arena's chunks, the embedding's: hashed as they are written
    try:
        with open(tmp, "wb") as f:
            os.chmod(tmp, 0o600)

            def put(data) -> None:
                f.write(data)
                regions[arena_bytes is not None].feed(memoryview(data))

            for name in order:
                tensor = state[name]
                put(b"\0" * (-f.tell() % ALIGN))
                if after_arena(name) and arena_bytes is None:  # the arena ends here
                    arena_bytes = f.tell()
                data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
                table.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), f.tell(), len(data)])
                put(data)
            offset = f.tell()
        arena_bytes = offset if arena_bytes is None else arena_bytes
        digests = [r.crcs() for r in regions]
        meta = {
            "format": FORMAT, "key": key, **about, "created": time.time(),
            "layout": {name: list(spec) for name, spec in layout.items()},
            "config": model.config.to_dict(), "generation_config": model.generation_config.to_dict(),
            "tensors": table, "bytes": offset, "arena_bytes": arena_bytes, "crc32": digests,
        }
        tmp.replace(weights)
    finally:
        tmp.unlink(missing_ok=True)
    tmp_record = record.with_suffix(f".tmp{os.getpid()}")
    tmp_record.write_text(json.dumps(meta))
    tmp_record.replace(record)


def _drop_stale(folder: Path, about: dict, key: str) -> None:
    """Delete the entries the one just stored replaces, ~0.7-1.8 GB each for a 1B model that nothing would
    read again: those of an older format, and those of the same checkpoint, mode, kernel and activations
    under another key (its files changed, or torch was upgraded)."""
    same = ("source", "mode", "kernel", "dtype")
    for record, meta, _ in _records(folder):
        old = isinstance(meta.get("format"), int) and meta["format"] < FORMAT
        if old or (meta.get("key") != key and all(meta.get(k) == about[k] for k in same)):
            record.with_suffix(".bin").unlink(missing_ok=True)
            record.unlink(missing_ok=True)


def _records(folder: Path):
    """(path, contents, mtime) of each readable cache record in `folder`."""
    try:
        paths = list(folder.glob("*.json"))
    except OSError:
        return
    for path in paths:
        try:
            meta, mtime = json.loads(path.read_text()), path.stat().st_mtime
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict):
            yield path, meta, mtime


class _ChunkCRC:
    """CRC-32 of each CHUNK of a region fed in order: what `_hash_range` reads back from the file."""

    def __init__(self):
        self.done, self.crc, self.filled = [], 0, 0

    def feed(self, data: memoryview) -> None:
        while len(data):
            take = min(CHUNK - self.filled, len(data))
            self.crc, self.filled, data = zlib.crc32(data[:take], self.crc), self.filled + take, data[take:]
            if self.filled == CHUNK:
                self.done.append(self.crc)
                self.crc, self.filled = 0, 0

    def crcs(self) -> list[int]:
        return self.done + ([self.crc] if self.filled else [])


def _hash_range(f, start: int, end: int) -> list[int]:
    """CRC-32 of each CHUNK of bytes [start, end) of file `f`, read without keeping them."""
    f.seek(start)
    return [zlib.crc32(f.read(min(CHUNK, end - pos))) for pos in range(start, end, CHUNK)]


def _hash_chunks(view: memoryview) -> list[int]:
    return [zlib.crc32(view[i:i + CHUNK]) for i in range(0, len(view), CHUNK)]


def _hugepage_view(nbytes: int) -> memoryview:
    """`nbytes` of fresh memory, 2 MB aligned, that Linux is asked to back with 2 MB pages (transparent huge
    pages): decoding streams every weight once per token, and with 4 KB pages TLB misses cost a third of
    the speed (int4, 1B shape: 29 -> 44 GB/s). The pages are written once before the file is read into
    them: faulting them in inside `readinto` made a warm start 1.1-1.4 s slower on this VM (whose host
    takes back free memory, so each fresh page costs the host a fault too)."""
    private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}  # shared memory gets no huge pages
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, **private)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    start = -base % HUGE_PAGE
    try:
        mm.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    except (AttributeError, OSError):  # not Linux, or no transparent huge pages: ordinary pages
        pass
    ctypes.memset(base + start, 0, nbytes)  # lets go of the GIL
    return memoryview(mm)[start:start + nbytes]


def _read_verified(weights: Path, meta: dict, cancelled: threading.Event) -> memoryview | None:
    """The file's first `arena_bytes` in a huge-page buffer, once the CRC-32 of every chunk of the whole
    file matches the record; None when the file is missing, its size or a chunk's hash is off, or the read
    is cancelled. Needs no torch: it may run while torch is being imported (`prefetch`)."""
    try:
        size, arena_bytes = meta["bytes"], meta["arena_bytes"]
        if weights.stat().st_size != size:
            return None
        view = _hugepage_view(arena_bytes)
        with open(weights, "rb", buffering=0) as f:
            got = 0
            while got < arena_bytes:
                n = 0 if cancelled.is_set() else f.readinto(view[got:got + CHUNK])
                if not n:
                    return None
                got += n
            if [_hash_chunks(view), _hash_range(f, arena_bytes, size)] != meta["crc32"]:
                return None
        return view
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _from_cache(meta: dict, reading: Prefetch, dtype):
    """The cached model, or None when the entry cannot be trusted. The read's result is awaited once the
    model's skeleton is built."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from model.quant import empty_quantized

    try:
        config_dict = dict(meta["config"])
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        empty_quantized(model, {k: tuple(v) for k, v in meta["layout"].items()}, dtype, meta["kernel"])
        view = reading.result.result()
        if view is None:
            return None
        arena = torch.frombuffer(view, dtype=torch.uint8)
        mapped = torch.from_file(str(reading.weights), shared=False, size=meta["bytes"], dtype=torch.uint8)
        state = {name: (arena if offset < meta["arena_bytes"] else mapped)[offset:offset + nbytes]
                 .view(getattr(torch, dt)).view(shape) for name, dt, shape, offset, nbytes in meta["tensors"]}
        inv_freq = state.pop(ROTARY_KEY, None)
        model.load_state_dict(state, strict=True, assign=True)
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=config)  # its buffers were on the meta device
        if inv_freq is not None:
            model.model.rotary_emb.inv_freq = inv_freq
            model.model.rotary_emb.original_inv_freq = inv_freq
        model.generation_config = GenerationConfig.from_dict(meta["generation_config"])
        return model
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError):
        return None
