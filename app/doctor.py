"""`llama-chat doctor`: what this machine and installation look like to llama-chat."""

from __future__ import annotations

import os
import platform


def _model_state(section) -> str:
    """Whether the model is here, or (on a server) whether the server answers and its tokenizer is here."""
    from model.loading import resolve_source, resolve_tokenizer

    if section.backend == "openai":
        return f"{_server_state(section)}; tokenizer {_model_state_of(resolve_tokenizer, section.source)}"
    return _model_state_of(resolve_source, section.source)


def _model_state_of(resolve, source: str) -> str:
    from model.errors import ModelError

    try:
        src = resolve(source)
        return f"present ({src.kind}: {src.path})"
    except ModelError as e:
        return f"missing: {e.message}"


def _server_state(section) -> str:
    from model.remote import OpenAIServer, RemoteError

    try:
        entry = OpenAIServer(section.base_url, api_key_env=section.api_key_env).pick_model(section.served_model)
    except RemoteError as e:
        return f"on {section.base_url}: NOT ANSWERING: {e.message}"
    return (f"on {section.base_url}: answers, serving {entry['id']}"
            f"{' (context ' + str(entry['max_model_len']) + ')' if entry.get('max_model_len') else ''}")


def report(config) -> str:
    import torch
    import transformers

    from app.paths import cache_dir, config_file, data_dir, database_file
    from model.compiled import can_compile
    from model.device import cpu_has_native_bf16, physical_cores, pick_device, pick_dtype, quantize_note

    device = pick_device(config.model.device)
    dtype = pick_dtype(config.model.dtype, device)
    weights, note = quantize_note(config.model.quantize, device, dtype)
    lines = [
        f"python        {platform.python_version()} on {platform.system()} {platform.machine()}",
        f"torch         {torch.__version__}   transformers {transformers.__version__}",
        f"device        {device} (asked: {config.model.device}); CUDA {'yes' if torch.cuda.is_available() else 'no'}",
        f"dtype         {str(dtype).replace('torch.', '')} "
        f"(asked: {config.model.dtype}; native CPU bf16: {'yes' if cpu_has_native_bf16() else 'no'})",
        f"cpu threads   {physical_cores()} physical cores",
        f"weights       {weights} (asked: {config.model.quantize}){' - ' + note if note else ''}",
        f"compiled      decoding {config.model.compile}: {can_compile() or 'available'}",
        f"int8/int4     {_quant_kernel()}",
        f"chat model    {config.model.source} ({config.model.backend}): {_model_state(config.model)}",
        f"guard         {'on' if config.guard.enabled else 'OFF (replies are not screened)'}, mode {config.guard.mode}, "
        f"threshold {config.guard.threshold}, excluded {', '.join(config.guard.excluded) or 'none'}",
        f"guard model   {config.guard.source} ({config.guard.backend}): {_model_state(config.guard)}",
        f"guard checks  {_guard_precision(config, device)}",
        f"config file   {config_file()}{'' if config_file().is_file() else ' (not created; defaults in use)'}",
        f"history       {database_file()}: {_history_state(database_file())}",
        f"data / cache  {data_dir()} / {cache_dir()}",
    ]
    return "\n".join(lines)


def _history_state(path) -> str:
    """Whether the history file reads whole (SQLite's quick check), its mode, and whether it can be written."""
    from app.errors import HistoryError
    from app.history import History

    if not path.exists():
        return "not created yet"
    try:
        h = History(path, read_only=True)
        h.check()
        count = len(h.list_conversations())
        h.close()
    except HistoryError as e:
        return e.message
    writable = os.access(path, os.W_OK) and os.access(path.parent, os.W_OK) and path.stat().st_mode & 0o200
    return (f"ok, {count} conversations, mode {path.stat().st_mode & 0o777:o}"
            f"{'' if writable else ', read-only: nothing new is stored'}")


def _quant_kernel() -> str:
    from model.qkernel import VARIANTS, available, variant

    why = available()
    if why is None:  # model.step.NativeStep
        return (f"native {variant()} kernel (model/kernels; LLAMA_CHAT_KERNEL forces {', '.join(VARIANTS)} or torch); "
                "decode steps run natively, not compiled")
    return f"PyTorch's kernels ({why})"


def _guard_precision(config, device: str) -> str:
    from app.engine import guard_settings
    from guard.precision import pick_precision, probe_outcome
    from model.device import pick_dtype
    from model.errors import ModelError
    from model.loading import resolve_source

    want, note = pick_precision(config.guard.precision, device)
    if want != "int8":
        return f"unquantized (asked: {config.guard.precision}){' - ' + note if note else ''}"
    g = config.guard
    try:
        outcome = probe_outcome(resolve_source(g.source), pick_dtype(config.model.dtype, device),
                                guard_settings(config))
    except (ModelError, ValueError):
        outcome = None
    if outcome is None:
        return (f"int8 (asked: {g.precision}) once it judges the guard probe set as full precision does "
                "(checked on its first load)")
    if outcome["passed"]:
        return f"int8 (asked: {g.precision}); it judged the guard probe set as full precision does"
    return f"unquantized (asked: {g.precision}) - int8 refused: {outcome['reason']}"
