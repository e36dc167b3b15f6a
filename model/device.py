"""Device, dtype and thread choices for running a model on this machine."""

from __future__ import annotations

import os


def physical_cores() -> int:
    """Physical cores (not hyper-threads) from /proc/cpuinfo, else the logical count."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            pairs, phys = set(), None
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    pairs.add((phys, value.strip()))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


def pick_device(requested: str = "auto") -> str:
    """`auto` picks CUDA, then MPS, then CPU; anything else is checked and returned."""
    import torch

    from model.errors import ModelError

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = requested.split(":")[0]
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }
    if kind not in available:
        raise ModelError(f"Unknown device {requested!r}. Use auto, cpu, cuda, cuda:N or mps.")
    if not available[kind]:
        raise ModelError(f"Device {requested!r} is not available on this machine. Use --device auto or cpu.")
    return requested


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX), where bf16 beats fp32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


DTYPES = ("auto", "bfloat16", "float16", "float32")


def pick_dtype(requested: str, device: str):
    """`auto` is bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere."""
    import torch

    from model.errors import ModelError

    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(requested, requested)
    if name not in DTYPES:
        raise ModelError(f"Unknown dtype {requested!r}. Use one of: {', '.join(DTYPES)}.")
    if name == "auto":
        kind = device.split(":")[0]
        if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        if kind == "mps":
            return torch.float16
        return torch.float32
    return getattr(torch, name)


def pick_quantize(requested: str, device: str, dtype) -> str:
    """`auto` is int4 on the CPU (its quality gate holds: README, "CPU weight modes"; measured on SmolLM2's
    Q4_1 GGUF, so it holds for a GGUF quantized again too) where a fast kernel runs it, else bf16 (none).
    See `quantize_note` for what happens to an explicit int8/int4 where only a slow kernel runs."""
    import torch

    if requested != "auto":
        return requested
    if device.split(":")[0] != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return "bf16"
    return "bf16" if slow_quantized(dtype) else "int4"


def slow_quantized(dtype) -> bool:
    """Whether the quantized modes would decode slower than unquantized weights here: no native kernel
    (model.qkernel) and fp32 activations, where PyTorch's int4 kernel, the fallback, decoded the 1B shape at
    1.0 tok/s against 4.0 unquantized (SmolLM2: 8.1 against 22.5)."""
    import torch

    from model.quant import kernel

    return kernel() != "native" and dtype != torch.bfloat16


def quantize_note(requested: str, device: str, dtype) -> tuple[str, str]:
    """(the weight mode to load, a sentence for the user or ""): an explicit quantized mode that only a slow
    kernel could run here is loaded unquantized instead, and the sentence says why."""
    mode = pick_quantize(requested, device, dtype)
    if mode == "bf16" or device.split(":")[0] != "cpu" or not slow_quantized(dtype):
        return mode, ""
    from model.qkernel import available

    return "bf16", (f"--quantize {mode} needs the native int8/int4 kernel, which does not run here ({available()}); "
                    "PyTorch's kernel with fp32 activations is slower than unquantized weights, so the weights stay "
                    "as they are.")


def configure_threads(device: str, threads: int | None = None) -> int:
    """Use one intra-op thread per physical core on CPU (hyper-threads slow matmuls down)."""
    import torch

    n = threads or physical_cores()
    if device.split(":")[0] == "cpu":
        torch.set_num_threads(n)
    return n


def peak_rss_mb() -> float:
    """This process image's peak RSS. VmHWM starts afresh at exec; ru_maxrss would also count the memory
    of the process that forked it (Linux keeps maxrss across exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
