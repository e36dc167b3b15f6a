"""Find a checkpoint (HF cache repo id, local folder, .gguf file, Meta original folder) and load it."""

from __future__ import annotations

import gc
import os
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from model.errors import ModelError

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@contextmanager
def paused_gc():
    """Python's cyclic garbage collector paused while a model loads. Importing torch and transformers and
    building the model create ~570k objects that live as long as the process, and the collector went over
    the growing heap again and again: ~0.5 s of a ~4 s warm start (int4, 1B shape). Afterwards they are
    moved to the oldest generation (gc.freeze, then gc.unfreeze), where garbage among them is still found,
    instead of a 0.2 s pass over all of them as new objects in the first reply. A session that keeps the
    models freezes them for as long as it holds them (app.workspace.attach)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if not gc.get_freeze_count():  # nobody else froze objects: unfreeze would release theirs
            gc.freeze()
            gc.unfreeze()
        gc.enable()


@dataclass(frozen=True)
class Source:
    """Where a checkpoint lives. `kind` is one of hf, folder, gguf, meta."""

    kind: str
    path: Path
    name: str  # what the user gave: a repo id or a path
    revision: str = ""  # HF snapshot hash, when known


def _folder_kind(folder: Path) -> str | None:
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "folder"
    if (folder / "params.json").is_file() and any(folder.glob("consolidated.*.pth")):
        return "meta"
    if (folder / "original" / "params.json").is_file():
        return "meta-sub"
    return None


def resolve_source(src: "str | os.PathLike | Source") -> Source:
    """Resolve what the user named; never touches the network. Errors say what was looked for."""
    if isinstance(src, Source):
        return src
    text = str(src)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelError(f"{path} is a file but not a .gguf checkpoint. Give a .gguf file or a model folder.")
            return Source("gguf", path.resolve(), text)
        kind = _folder_kind(path)
        if kind == "meta-sub":
            return Source("meta", (path / "original").resolve(), text)
        if kind is None:
            raise ModelError(
                f"{path} holds no checkpoint: expected config.json with *.safetensors (Hugging Face format) "
                "or params.json with consolidated.00.pth and tokenizer.model (Meta's original format)."
            )
        return Source(kind, path.resolve(), text)
    if REPO_ID.match(text) and not text.startswith((".", "/")):
        return _from_hf_cache(text)
    raise ModelError(f"Model {text!r} not found: it is neither an existing path nor a Hugging Face repo id.")


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


def resolve_tokenizer(src: str | os.PathLike) -> Source:
    """The tokenizer a remote engine's prompts are built with: a checkpoint (any kind `resolve_source`
    takes), a folder holding tokenizer.json, or a repo id whose tokenizer files alone are in the HF cache
    (`llama-chat download` fetches only those for a remote engine). Never touches the network."""
    text = str(src)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return Source("tokenizer", path.resolve(), text)
    if not path.exists() and REPO_ID.match(text) and not text.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            folder = Path(snapshot_download(text, local_files_only=True, allow_patterns=TOKENIZER_FILES))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError):
            folder = None
        if folder is not None and (folder / "tokenizer.json").is_file():
            return Source("tokenizer", folder, text, revision=folder.name)
        raise ModelError(
            f"The tokenizer of {text} is not in the local Hugging Face cache ({_hf_cache_dir()}). A remote engine "
            "needs it to build prompts: fetch it once with `llama-chat download` (only the tokenizer files, for a "
            "remote backend), or give a folder holding tokenizer.json.",
            title="Tokenizer not downloaded",
        )
    return resolve_source(src)


def _from_hf_cache(repo_id: str) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        raise ModelError(
            f"{repo_id} is not in the local Hugging Face cache ({_hf_cache_dir()}). Download it once with "
            "`llama-chat download` (gated Llama models need the license accepted on huggingface.co and a "
            "token from `hf auth login` or HF_TOKEN), or give a local folder or .gguf file instead.",
            title="Model not downloaded",
        ) from e
    kind = _folder_kind(folder)
    if kind not in ("folder", "meta", "meta-sub"):
        raise ModelError(f"The cached copy of {repo_id} at {folder} is incomplete; download it again.")
    if kind == "meta-sub":
        kind, folder = "meta", folder / "original"
    return Source(kind, folder, repo_id, revision=folder.name if kind == "folder" else folder.parent.name)


def _hf_cache_dir() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return HF_HUB_CACHE


@dataclass
class Loaded:
    model: object
    tokenizer: object
    source: Source
    eos_ids: tuple[int, ...]
    generation_defaults: dict


def load_checkpoint(source: Source, *, device: str, dtype, quantize: str = "bf16", cache_folder: Path | None = None,
                    progress=None, prefetched=None) -> Loaded:
    """Load model and tokenizer in `dtype` on `device`, all from local files. A `quantize` mode other
    than bf16 builds the quantized model once (telling `progress(text)`) and reuses it from `cache_folder`
    afterwards (`prefetched`: model.qcache.prefetch)."""
    try:
        with one_gguf_reader() if source.kind == "gguf" else nullcontext():
            if quantize == "bf16":
                tokenizer = load_tokenizer(source)
                model = load_model(source, dtype)
            else:
                from model.qcache import load_quantized

                if device != "cpu":
                    raise ModelError(f"--quantize {quantize} is for CPU decoding; on {device} use bf16.")
                model, tokenizer = load_quantized(source, quantize, dtype=dtype, cache_folder=cache_folder,
                                                  build=lambda: load_model(source, dtype),
                                                  alongside=lambda: load_tokenizer(source), progress=progress,
                                                  prefetched=prefetched)
    except ModelError:
        raise
    except Exception as e:  # transformers raises many types; the user needs to know which file failed
        raise ModelError(f"Could not load the checkpoint at {source.path}: {e}", title="Model load failed") from e
    model.to(device).eval()
    return Loaded(model, tokenizer, source, eos_ids(model, tokenizer), generation_defaults(model))


def _transformers_args(source: Source) -> tuple[Path, dict]:
    if source.kind == "gguf":
        return source.path.parent, {"gguf_file": source.path.name, "local_files_only": True}
    return source.path, {"local_files_only": True}


def load_tokenizer(source: Source):
    if source.kind == "meta":
        from model.meta_format import tokenizer_from_tiktoken

        return tokenizer_from_tiktoken(source.path / "tokenizer.model")
    from transformers import AutoTokenizer

    folder, kwargs = _transformers_args(source)
    # A .gguf carries its tokenizer; tokenizer files beside it win (they keep the chat template exact).
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if source.kind == "gguf":
        from model.qcache import cached_tokenizer

        return cached_tokenizer(source, lambda: AutoTokenizer.from_pretrained(folder, **kwargs))
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def load_model(source: Source, dtype):
    """The model in `dtype` on the CPU, unquantized."""
    if source.kind == "meta":
        from model.meta_format import load_meta_model

        return load_meta_model(source.path, dtype=dtype)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, kwargs = _transformers_args(source)
    with _quiet_gguf_progress():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    if source.kind == "gguf":
        apply_gguf_rope_freqs(model, source.path)
    return model


@contextmanager
def one_gguf_reader():
    """transformers reads a .gguf three times on a first load (its config, its tokenizer, its weights), each
    time with a new `gguf.GGUFReader`, which decodes every metadata field in Python (for Llama 3.2, the 1.2M
    strings of its vocabulary and merges). Within this block one reader per file serves all three (it maps
    the file read-only; nothing changes it)."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


@contextmanager
def _quiet_gguf_progress():
    """transformers draws a tqdm bar on stderr while it converts GGUF tensors; in a terminal UI that
    would scribble over the screen, and the app shows its own loading state."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def apply_gguf_rope_freqs(model, path: Path) -> None:
    """Llama 3.1+ GGUF files carry their rope scaling as a `rope_freqs.weight` tensor of per-frequency
    divisors, which transformers does not read; without it positions are encoded wrongly."""
    import torch

    from model.gguf import read_f32_tensor

    factors = read_f32_tensor(path, "rope_freqs.weight")
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if factors is None or rotary is None:
        return
    divisors = torch.from_numpy(factors)
    if divisors.shape != rotary.inv_freq.shape:
        raise ModelError(f"{path}: rope_freqs has {divisors.numel()} entries, the model expects {rotary.inv_freq.numel()}.")
    base = rotary.original_inv_freq if hasattr(rotary, "original_inv_freq") else rotary.inv_freq
    rotary.inv_freq = (base.float().cpu() / divisors).to(rotary.inv_freq.device)
    rotary.original_inv_freq = rotary.inv_freq


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    """Every id that ends a reply: the generation config's eos list, the config's, the tokenizer's."""
    found: list[int] = []
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        tokenizer.eos_token_id,
        _token_id(tokenizer, "<|eot_id|>"),
    ):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(i, int) and i not in found:
                found.append(i)
    if not found:
        raise ModelError("The checkpoint names no end-of-sequence token; it cannot be used for chat.")
    return tuple(found)


def _token_id(tokenizer, token: str) -> int | None:
    """The id of `token` if the vocabulary has it (without building the whole vocabulary: ~0.1 s)."""
    i = tokenizer.convert_tokens_to_ids(token)
    return i if isinstance(i, int) and tokenizer.convert_ids_to_tokens(i) == token else None


def generation_defaults(model) -> dict:
    """Sampling defaults from the checkpoint's generation config (Llama 3.2: 0.6 / 0.9)."""
    gc = getattr(model, "generation_config", None)
    do_sample = getattr(gc, "do_sample", False)
    return {
        "temperature": float(getattr(gc, "temperature", None) or 0.6) if do_sample else 0.0,
        "top_p": float(getattr(gc, "top_p", None) or 1.0),
        "top_k": int(getattr(gc, "top_k", None) or 0),
    }
