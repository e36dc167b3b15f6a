"""The int8/int4 kernels for CPU decoding (model/kernels: the matmul in qlinear.cpp, a whole decode step
in decode.cpp), built on first use.

PyTorch's own weight-only kernels dequantize every weight to floating point, which kept a 1B model's
int4 decoding well below what memory can deliver on a 2-core CPU (~21 GB/s of weights). This kernel
quantizes the activations to int8 per block of 32 and multiplies with AVX512-VNNI, like llama.cpp; with
the weights on 2 MB pages (see `model.qcache._hugepage_view`) it streams weights about as fast as the machine reads
memory (29-56 GB/s here, as the VM's bandwidth varied).

The sources are compiled once per source version and compiler into the app's cache folder with the
system's C++ compiler (about a second) and called through ctypes: no torch headers, no build step at
install.
Where it cannot run (no AVX512-VNNI, no compiler, another OS, LLAMA_CHAT_KERNEL=torch), `load()` says
why and the quantized modes use PyTorch's kernels instead (model.quant).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
from pathlib import Path

import torch  # loaded first, so the kernel binds to torch's OpenMP runtime (one thread pool)

KERNELS = Path(__file__).with_name("kernels")
SOURCES = (KERNELS / "qlinear.cpp", KERNELS / "decode.cpp")  # with KERNELS / "qlinear.h"
CPU_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni")
CFLAGS = ("-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC",
          "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mfma")


class Unavailable(RuntimeError):
    """The kernel cannot run here; the message says why."""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def load():
    """The kernel library (ctypes: `lc_qlinear`, `lc_decode`); raises `Unavailable` when it cannot run
    here. Decided once per process."""
    found = _entry_point()
    if isinstance(found, Unavailable):
        raise found
    return found


@functools.cache
def _entry_point():
    """The kernel library, or the `Unavailable` that says why there is none."""
    try:
        return _build_and_load()
    except Unavailable as e:
        return e


def _build_and_load():
    if os.environ.get("LLAMA_CHAT_KERNEL", "").lower() == "torch":
        raise Unavailable("LLAMA_CHAT_KERNEL=torch asks for PyTorch's kernels")
    missing = [f for f in CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        raise Unavailable(f"this CPU lacks {', '.join(missing)}")
    from model.device import find_cxx

    cxx = find_cxx()
    if cxx is None:
        raise Unavailable("no C++ compiler found (install g++ or clang++)")
    from model.qcache import app_cache_folder

    source = b"".join(p.read_bytes() for p in (*SOURCES, KERNELS / "qlinear.h"))
    digest = hashlib.sha256(source + " ".join((cxx, *CFLAGS)).encode()).hexdigest()[:16]
    lib = app_cache_folder() / "kernels" / f"qlinear-{digest}.so"
    try:
        if not lib.is_file():
            lib.parent.mkdir(parents=True, exist_ok=True)
            tmp = lib.with_suffix(f".tmp{os.getpid()}.so")
            proc = subprocess.run([cxx, *CFLAGS, *map(str, SOURCES), "-o", str(tmp)], capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise Unavailable(f"compiling model/kernels failed: {proc.stderr.strip()[-500:]}")
            tmp.replace(lib)
        found = ctypes.CDLL(str(lib))
        fn, step = found.lc_qlinear, found.lc_decode
    except (OSError, AttributeError) as e:
        raise Unavailable(f"cannot build or load {lib}: {e}") from e
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    fn.restype = step.restype = ctypes.c_int
    fn.argtypes = [ptr, c_int, i64, i64, ptr, c_int, i64, i64, ptr, c_int, c_int]
    step.argtypes = [ptr, ctypes.POINTER(DecodeLayer), ctypes.POINTER(DecodeShape), ptr, ptr, c_int]
    return found


class QMat(ctypes.Structure):  # the kernels' structs (qlinear.h, decode.cpp), field for field
    _fields_ = [("data", ctypes.c_void_p), ("group", ctypes.c_int64), ("bits", ctypes.c_int64), ("n", ctypes.c_int64)]


class DecodeLayer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                *((name, QMat) for name in ("q", "k", "v", "o", "gate", "up", "down")),
                ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p), ("capacity", ctypes.c_int64)]


class DecodeShape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "position")] + \
               [("eps", ctypes.c_float), ("scale", ctypes.c_float)]


def available() -> str | None:
    """None when the kernel runs here; else why not."""
    try:
        load()
    except Unavailable as e:
        return str(e)
    return None


def qlinear(x, weights, group: int, bits: int, out_features: int, float_out: bool = False):
    """x @ W.T for W packed by `model.quant.pack_tiles`; x is fp32 or bf16, the result has its dtype, or
    fp32 with `float_out`."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype not in (torch.float32, torch.bfloat16):
        x2 = x2.float()
    x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], out_features, dtype=torch.float32 if float_out else x2.dtype)
    status = load().lc_qlinear(x2.data_ptr(), int(x2.dtype == torch.bfloat16), x2.shape[0], x2.shape[1],
                               weights.data_ptr(), bits, group, out_features, y.data_ptr(),
                               int(y.dtype == torch.bfloat16), torch.get_num_threads())
    if status != 0:
        raise ValueError(f"qlinear: unsupported shape (in {x2.shape[1]}, group {group}, bits {bits})")
    return y.reshape(*shape[:-1], out_features)
