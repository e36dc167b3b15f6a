"""Quantize once: quantized weights cached per checkpoint revision, mode and kernel, loaded without ever
materialising the bf16 weights (meta-device model, `load_state_dict(assign=True)`).

An entry is a `.bin` file holding every tensor of the state dict back to back, plus a `.json` record
(key, layout, config, tensor table, size, CRC-32 per 64 MB chunk). Loading reads what decoding streams
every token straight into one buffer on 2 MB pages (model.qkernel.hugepage_buffer), and memory-maps the
input embedding (a lookup touches a few of its rows). Every byte is checked before use: a CRC-32
finds a flipped bit or a torn write and runs at ~4 GB/s here (SHA-256: 1.8), which matters at start-up.
An entry that is missing, stale (another key), truncated, altered or does not fit the model is rebuilt,
never trusted blindly. A GGUF file's tokenizer is converted once and kept the same way (`cached_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = 3
CHUNK = 64 << 20
ALIGN = 64
ROTARY_KEY = "__rotary_inv_freq__"  # GGUF checkpoints carry rope factors that live in a non-saved buffer


def _fingerprint(source) -> str:
    """What identifies the weights: the HF snapshot hash, else the weight files' names, sizes, mtimes."""
    if source.revision:
        return source.revision
    files = [source.path] if source.path.is_file() else sorted(
        p for p in source.path.iterdir() if p.suffix in (".safetensors", ".pth", ".gguf", ".json", ".bin"))
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def cache_key(source, mode: str, dtype, kernel: str = "torch") -> str:
    import torch

    ident = f"{FORMAT}|{source.kind}|{source.path}|{_fingerprint(source)}|{mode}|{kernel}|{dtype}|{torch.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def app_cache_folder() -> Path:
    """The app's cache folder (LLAMA_CHAT_HOME aware) without importing the app package."""
    home = os.environ.get("LLAMA_CHAT_HOME")
    if home:
        return Path(home).expanduser() / "cache"
    from platformdirs import user_cache_path

    return user_cache_path("llama-chat")


def cached_tokenizer(source, convert):
    """The tokenizer `convert()` builds from `source` (a GGUF file: reading its vocabulary in Python takes
    ~4 s for SmolLM2's 49k tokens), saved once in the app's cache folder, keyed by the file and the
    transformers version, and loaded from there (~0.3 s) while every saved file's CRC-32 matches its record."""
    import transformers
    from transformers import AutoTokenizer

    ident = f"{FORMAT}|tokenizer|{source.path}|{_fingerprint(source)}|{transformers.__version__}"
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


def load_quantized(source, mode: str, *, dtype, cache_folder: Path | None, build, alongside=None, progress=None):
    """(the quantized model, what `alongside()` returned). The model comes from the cache, or is built with
    `build()` (bf16 on CPU), quantized, stored and read back (so its weights sit on huge pages either way).
    `alongside` (loading the tokenizer, say) runs in this thread while a cache hit's weights stream in.
    `progress(text)` hears when the model has to be built (a first start: seconds to a minute)."""
    from model.quant import kernel, quantize_model

    kernel_name = kernel()
    folder = Path(cache_folder) if cache_folder else app_cache_folder() / "quantized"
    key = cache_key(source, mode, dtype, kernel_name)
    weights, record = folder / f"{key}.bin", folder / f"{key}.json"
    meta = _record(record, key)
    with ThreadPoolExecutor(1) as pool:  # file reads and hashing let go of the GIL
        reading = pool.submit(_read_verified, weights, meta) if meta else None
        extra = alongside() if alongside else None
        model = _from_cache(meta, reading.result, dtype) if reading else None
    if model is not None:
        model.quant_cache = "hit"
        return model, extra
    if progress:
        progress(f"Quantizing {Path(source.name).name} to {mode} (first start only)…")
    model = build()
    layout = quantize_model(model, mode, kernel_name)
    try:
        _store(model, layout, mode, kernel_name, key, weights, record)
    except OSError as e:  # a full disk or a read-only cache: run from memory this time
        log.warning("could not store the quantized model in %s: %s", folder, e)
        model.quant_cache = "built"
        return model, extra
    del model
    meta = _record(record, key)
    model = _from_cache(meta, lambda: _read_verified(weights, meta), dtype) if meta else None
    if model is None:
        raise OSError(f"the quantized model just written to {weights} does not read back; is the disk failing?")
    model.quant_cache = "built"
    return model, extra


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


def _store(model, layout, mode, kernel_name, key, weights: Path, record: Path) -> None:
    """Write the state dict: first what decoding streams every token (read into huge pages at load), then
    the input embedding (memory-mapped at load: a token lookup touches a few rows of its 0.5 GB)."""
    import torch

    embedding = model.get_input_embeddings().weight.data_ptr()
    state = _state(model)
    order = sorted(state, key=lambda name: state[name].data_ptr() == embedding)  # the embedding last
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
                if tensor.data_ptr() == embedding and arena_bytes is None:  # the arena ends here
                    arena_bytes = f.tell()
                data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
                table.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), f.tell(), len(data)])
                put(data)
            offset = f.tell()
        arena_bytes = offset if arena_bytes is None else arena_bytes
        digests = [r.crcs() for r in regions]
        meta = {
            "format": FORMAT, "key": key, "mode": mode, "kernel": kernel_name, "created": time.time(),
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


def _read_verified(weights: Path, meta: dict):
    """(huge-page buffer holding the file's first `arena_bytes`, memory map of the whole file), or None
    when the file is missing, or its size or any chunk's hash is off."""
    import torch

    from model.qkernel import hugepage_buffer

    try:
        size, arena_bytes = meta["bytes"], meta["arena_bytes"]
        if weights.stat().st_size != size:
            return None
        buf = hugepage_buffer(arena_bytes)
        view = memoryview(buf.numpy())
        with open(weights, "rb", buffering=0) as f:
            got = 0
            while got < arena_bytes:
                n = f.readinto(view[got:got + CHUNK])
                if not n:
                    return None
                got += n
            if [_hash_chunks(view), _hash_range(f, arena_bytes, size)] != meta["crc32"]:
                return None
        return buf, torch.from_file(str(weights), shared=False, size=size, dtype=torch.uint8)
    except (OSError, KeyError, TypeError, ValueError, RuntimeError):
        return None


def _from_cache(meta: dict, weights, dtype):
    """The cached model, or None when the entry cannot be trusted. `weights()` returns what
    `_read_verified` does; it is called once the model's skeleton is built (the read may still be running)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from model.quant import empty_quantized

    try:
        config_dict = dict(meta["config"])
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        empty_quantized(model, {k: tuple(v) for k, v in meta["layout"].items()}, dtype, meta["kernel"])
        buffers = weights()
        if buffers is None:
            return None
        arena, mapped = buffers
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
