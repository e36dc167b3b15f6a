"""Quantize once: quantized weights cached per checkpoint revision and mode, loaded without ever
materialising the bf16 weights (meta-device model, memory-mapped state dict, `assign=True`).

An entry is a `.pt` state dict plus a `.json` record (key, layout, config, size, BLAKE2 digest). An
entry that is missing, stale (another key), truncated, altered or does not fit the model is rebuilt,
never trusted blindly.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

FORMAT = 1
ROTARY_KEY = "__rotary_inv_freq__"  # GGUF checkpoints carry rope factors that live in a non-saved buffer


def _fingerprint(source) -> str:
    """What identifies the weights: the HF snapshot hash, else the weight files' names, sizes, mtimes."""
    if source.revision:
        return source.revision
    files = [source.path] if source.path.is_file() else sorted(
        p for p in source.path.iterdir() if p.suffix in (".safetensors", ".pth", ".gguf", ".json", ".bin"))
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def cache_key(source, mode: str, dtype) -> str:
    import torch

    ident = f"{FORMAT}|{source.kind}|{source.path}|{_fingerprint(source)}|{mode}|{dtype}|{torch.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def app_cache_folder() -> Path:
    """The app's cache folder (LLAMA_CHAT_HOME aware) without importing the app package."""
    home = os.environ.get("LLAMA_CHAT_HOME")
    if home:
        return Path(home).expanduser() / "cache"
    from platformdirs import user_cache_path

    return user_cache_path("llama-chat")


def load_quantized(source, mode: str, *, dtype, cache_folder: Path | None, build):
    """The quantized model from the cache, or built with `build()` (bf16 on CPU), quantized and stored."""
    folder = Path(cache_folder) if cache_folder else app_cache_folder() / "quantized"
    key = cache_key(source, mode, dtype)
    weights, record = folder / f"{key}.pt", folder / f"{key}.json"
    model = _from_cache(weights, record, key, dtype)
    if model is not None:
        model.quant_cache = "hit"
        return model
    from model.quant import quantize_model

    model = build()
    layout = quantize_model(model, mode)
    _store(model, layout, mode, key, weights, record)
    model.quant_cache = "built"
    return model


def _store(model, layout, mode, key, weights: Path, record: Path) -> None:
    import torch

    weights.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    state = dict(model.state_dict())
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is not None:
        state[ROTARY_KEY] = rotary.inv_freq
    tmp = weights.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    meta = {
        "format": FORMAT, "key": key, "mode": mode, "created": time.time(),
        "layout": {name: list(spec) for name, spec in layout.items()},
        "config": model.config.to_dict(), "generation_config": model.generation_config.to_dict(),
        "bytes": tmp.stat().st_size, "blake2b": _digest(tmp),
    }
    os.chmod(tmp, 0o600)
    tmp.replace(weights)
    tmp_record = record.with_suffix(f".tmp{os.getpid()}")
    tmp_record.write_text(json.dumps(meta))
    tmp_record.replace(record)


def _from_cache(weights: Path, record: Path, key: str, dtype):
    """The cached model, or None when the entry is absent or cannot be trusted."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from model.quant import empty_quantized

    try:
        meta = json.loads(record.read_text())
        if meta.get("format") != FORMAT or meta.get("key") != key or weights.stat().st_size != meta["bytes"]:
            return None
        if _digest(weights) != meta["blake2b"]:
            return None
        config_dict = dict(meta["config"])
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        empty_quantized(model, {k: tuple(v) for k, v in meta["layout"].items()}, dtype)
        state = torch.load(weights, map_location="cpu", mmap=True, weights_only=True)
        inv_freq = state.pop(ROTARY_KEY, None)
        model.load_state_dict(state, strict=True, assign=True)
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=config)  # its buffers were on the meta device
        if inv_freq is not None:
            model.model.rotary_emb.inv_freq = inv_freq
            model.model.rotary_emb.original_inv_freq = inv_freq
        model.generation_config = GenerationConfig.from_dict(meta["generation_config"])
        return model
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, json.JSONDecodeError, AttributeError):
        return None
