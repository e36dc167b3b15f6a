"""The kernels' reference arithmetic in PyTorch, and a runner for kernel variants this machine cannot load
(the NEON build under qemu-user): tests/kernels/driver.cpp built with model/kernels for that variant."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import torch

from model.qkernel import BASE_FLAGS, KERNELS, SOURCES, VARIANTS

DRIVER = Path(__file__).parents[1] / "kernels" / "driver.cpp"
CROSS = {"neon": ("aarch64-linux-gnu-g++", "qemu-aarch64", "Debian's g++-aarch64-linux-gnu and qemu-user")}


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernel rounds it: int8 per block of 32 with scale max|x| / 127."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / torch.where(d > 0, d, 1)) * d).reshape(x.shape)


def build_driver(variant: str, folder: Path) -> tuple[Path, list[str]]:
    """(the driver built for `variant`, the command prefix that runs it); raises LookupError naming what
    is missing."""
    cxx, runner, packages = CROSS[variant]
    if not (shutil.which(cxx) and shutil.which(runner)):
        raise LookupError(f"the {variant} kernel's tests need {cxx} and {runner} ({packages})")
    out = folder / f"driver-{variant}"
    flags = [f for f in (*BASE_FLAGS, *VARIANTS[variant][2]) if f not in ("-shared", "-fPIC")]
    subprocess.run([cxx, *flags, "-static", f"-I{KERNELS}", str(DRIVER), *(str(KERNELS / s) for s in SOURCES),
                    "-o", str(out)], check=True, capture_output=True, text=True)
    return out, [runner]


def _blob(data: bytes) -> bytes:
    return struct.pack("<q", len(data)) + data


def _ints(*values: int) -> bytes:
    return _blob(struct.pack(f"<{len(values)}q", *values))


def _tensor(t: torch.Tensor) -> bytes:
    return _blob(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def qlinear_job(x: torch.Tensor, q) -> bytes:
    """y = q(x) for a 2-D fp32 or bf16 x; the result comes back in x's dtype."""
    bf16 = int(x.dtype == torch.bfloat16)
    return (_ints(1, x.shape[0], x.shape[1], q.out_features, q.bits, q.group, bf16, bf16) + _tensor(x)
            + _tensor(q.packed))


def decode_job(model, buffers, position: int, h, cos, sin) -> bytes:
    """One lc_decode step of `model` (every decoder projection a QLinear) at `position`, over the cache
    layers' (keys, values) `buffers` ([1, kv_heads, capacity, head_dim] each)."""
    from model.qkernel import DecodeShape

    config, layers = model.config, model.model.layers
    attn0 = layers[0].self_attn
    shape = DecodeShape(layers=len(layers), hidden=config.hidden_size, heads=config.num_attention_heads,
                        kv_heads=config.num_key_value_heads, head_dim=attn0.head_dim,
                        intermediate=config.intermediate_size, position=position,
                        fp32=int(model.dtype == torch.float32), eps=config.rms_norm_eps, scale=attn0.scaling)
    job = _ints(2, 1) + _blob(bytes(shape))
    for layer, (keys, values) in zip(layers, buffers):
        attn, mlp = layer.self_attn, layer.mlp
        job += _tensor(layer.input_layernorm.weight) + _tensor(layer.post_attention_layernorm.weight)
        for q in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            job += _ints(q.group, q.bits, q.out_features) + _tensor(q.packed)
        job += _ints(keys.shape[-2]) + _tensor(keys) + _tensor(values)
    return job + _tensor(h) + _tensor(cos) + _tensor(sin)


def run_jobs(driver: Path, prefix: list[str], jobs: list[bytes], folder: Path) -> list[bytes]:
    """Every blob the driver wrote for `jobs`, in order."""
    src, dst = folder / "jobs.bin", folder / "results.bin"
    src.write_bytes(b"".join(jobs))
    subprocess.run([*prefix, str(driver), str(src), str(dst)], check=True, capture_output=True, timeout=600)
    data, out = dst.read_bytes(), []
    while data:
        (n,) = struct.unpack("<q", data[:8])
        out.append(data[8 : 8 + n])
        data = data[8 + n :]
    return out


def as_tensor(blob: bytes, dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=dtype).reshape(shape)
