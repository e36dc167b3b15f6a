"""`llama-chat doctor`: what this machine and installation look like to llama-chat."""

from __future__ import annotations

import platform


def _model_state(source: str) -> str:
    from model.errors import ModelError
    from model.loading import resolve_source

    try:
        src = resolve_source(source)
        return f"present ({src.kind}: {src.path})"
    except ModelError as e:
        return f"missing: {e.message}"


def report(config) -> str:
    import torch
    import transformers

    from app.paths import cache_dir, config_file, data_dir, database_file
    from model.compiled import can_compile
    from model.device import cpu_has_native_bf16, physical_cores, pick_device, pick_dtype, pick_quantize

    device = pick_device(config.model.device)
    dtype = pick_dtype(config.model.dtype, device)
    lines = [
        f"python        {platform.python_version()} on {platform.system()} {platform.machine()}",
        f"torch         {torch.__version__}   transformers {transformers.__version__}",
        f"device        {device} (asked: {config.model.device}); CUDA {'yes' if torch.cuda.is_available() else 'no'}",
        f"dtype         {str(dtype).replace('torch.', '')} "
        f"(asked: {config.model.dtype}; native CPU bf16: {'yes' if cpu_has_native_bf16() else 'no'})",
        f"cpu threads   {physical_cores()} physical cores",
        f"weights       {pick_quantize(config.model.quantize, device, dtype)} (asked: {config.model.quantize}); "
        f"compiled decoding {config.model.compile}: "
        f"{can_compile() or 'available'}",
        f"int8/int4     {_quant_kernel()}",
        f"chat model    {config.model.source}: {_model_state(config.model.source)}",
        f"guard         {'on' if config.guard.enabled else 'OFF (replies are not screened)'}, mode {config.guard.mode}, "
        f"threshold {config.guard.threshold}, excluded {', '.join(config.guard.excluded) or 'none'}",
        f"guard model   {config.guard.source}: {_model_state(config.guard.source)}",
        f"config file   {config_file()}{'' if config_file().is_file() else ' (not created; defaults in use)'}",
        f"history       {database_file()}",
        f"data / cache  {data_dir()} / {cache_dir()}",
    ]
    return "\n".join(lines)


def _quant_kernel() -> str:
    from model.qkernel import available

    why = available()
    if why is None:  # model.step.NativeStep: bf16 activations
        return "AVX512-VNNI kernel (model/kernels); in bf16, decode steps run natively, not compiled"
    return f"PyTorch's kernels ({why})"
