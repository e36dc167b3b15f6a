"""The int8/int4 kernels for CPU decoding (model/kernels: the matmul in qlinear.cpp, a whole decode step
in decode.cpp), built on first use for the CPU at hand.

PyTorch's own weight-only kernels dequantize every weight to floating point, which kept a 1B model's
int4 decoding well below what memory can deliver on a 2-core CPU. These kernels quantize the activations
to int8 per block of 32 and multiply with integer dot products, like llama.cpp. One source, built as one
variant per instruction set (model/kernels/arch_<variant>.h), all with the same calls and the same packed
weights:

- amx: the avx512 variant whose prompt rows (16 and more) multiply on AMX-INT8's tile unit (Intel Xeon
  since Sapphire Rapids): the same results, faster prefill and guard checks (decoding is avx512's);
- avx512: AVX512-VNNI (AMD Zen 4 and later, Intel Xeon since Cascade Lake, Ice/Tiger Lake laptops);
- avxvnni: AVX2 + FMA + AVX-VNNI (Intel's 12th generation and later without AVX-512, AMD Zen 5 has it too):
  the avx2 variant with the 256-bit vpdpbusd;
- avx2: AVX2 + FMA (Intel since Haswell; AMD Zen 1-3);
- neon: aarch64 with the dot-product extension (Apple M1 and later, Graviton 2 and later, Snapdragon X).

The fastest variant the CPU has is used; `LLAMA_CHAT_KERNEL=avx2` (or amx, avx512, avxvnni, neon) forces one, and
`LLAMA_CHAT_KERNEL=torch` asks for PyTorch's kernels. The sources are compiled once per variant, source
version and compiler version into the app's cache folder with the system's C++ compiler (a few seconds)
and called through ctypes: no torch headers, no build step at install. The library reports its ABI
version and variant, and is used only when both are the ones asked for. Where no variant can run (an
unsupported CPU, no compiler), `load()` says why and the quantized modes use PyTorch's kernels instead
(model.quant).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
from pathlib import Path

import torch  # loaded first, so the kernel binds to torch's OpenMP runtime (one thread pool)

KERNELS = Path(__file__).with_name("kernels")
SOURCES = ("qlinear.cpp", "decode.cpp")
HEADERS = ("qlinear.h", "arch_amx.h", "arch_avx512.h", "arch_avx2.h", "arch_neon.h", "decode_avx512.h")
ABI = 3  # LC_ABI in model/kernels/qlinear.h
BASE_FLAGS = ("-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC")
# variant: (machine, CPU flags it needs as /proc/cpuinfo names them, compiler flags); fastest first
_AVX512_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni")
_AVX512_BUILD = ("-DLC_AVX512", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mfma")
VARIANTS = {
    "amx": ("x86_64", (*_AVX512_FLAGS, "amx_tile", "amx_int8"), (*_AVX512_BUILD, "-DLC_AMX", "-mamx-tile", "-mamx-int8")),
    "avx512": ("x86_64", _AVX512_FLAGS, _AVX512_BUILD),
    "avxvnni": ("x86_64", ("avx2", "fma", "avx_vnni"),
                ("-DLC_AVX2", "-DLC_AVXVNNI", "-mavx2", "-mfma", "-mavxvnni", "-ffp-contract=fast")),
    "avx2": ("x86_64", ("avx2", "fma"), ("-DLC_AVX2", "-mavx2", "-mfma", "-ffp-contract=fast")),
    "neon": ("aarch64", ("asimddp",), ("-DLC_NEON", "-march=armv8.2-a+dotprod", "-ffp-contract=fast")),
}


class Unavailable(RuntimeError):
    """The kernel cannot run here; the message says why."""


def _machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 "flags", aarch64 "Features" in /proc/cpuinfo; on macOS, sysctl)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    if platform.system() == "Darwin" and _machine() == "aarch64":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_DotProd"], capture_output=True, text=True,
                                 timeout=5, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        return {"asimddp"} if out == "1" else set()
    return set()


def pick_variant(requested: str | None = None, machine: str | None = None, flags: set[str] | None = None) -> str:
    """The variant to build: `requested` (LLAMA_CHAT_KERNEL by default) when the CPU has it, else the fastest
    one it has. Raises `Unavailable` saying why none fits."""
    return pick_variants(requested, machine, flags)[0]


def pick_variants(requested: str | None = None, machine: str | None = None, flags: set[str] | None = None) -> list[str]:
    """`requested` alone when the CPU has it, else every variant the CPU has, fastest first (a compiler too
    old for one, e.g. GCC 10 for AVX-VNNI, gets the next). Raises `Unavailable` saying why none fits."""
    requested = (os.environ.get("LLAMA_CHAT_KERNEL", "") if requested is None else requested).lower()
    machine = machine or _machine()
    flags = _cpu_flags() if flags is None else flags
    if requested == "torch":
        raise Unavailable("LLAMA_CHAT_KERNEL=torch asks for PyTorch's kernels")
    if requested and requested not in VARIANTS:
        raise Unavailable(f"LLAMA_CHAT_KERNEL={requested} is not a kernel: use {', '.join(VARIANTS)} or torch")
    found = []
    for name in [requested] if requested else VARIANTS:
        arch, needs, _ = VARIANTS[name]
        missing = [f for f in needs if f not in flags]
        if arch == machine and not missing:
            found.append(name)
        elif requested:
            why = f"this is a {machine} CPU" if arch != machine else f"this CPU lacks {', '.join(missing)}"
            raise Unavailable(f"LLAMA_CHAT_KERNEL={name} asks for the {name} kernel, but {why}")
    if not found:
        raise Unavailable(f"this CPU has none of the kernels' instruction sets ({machine}: needs AVX2 + FMA, "
                          "AVX512-VNNI or NEON with the dot-product extension)")
    return found


def build(variant: str, cxx: str, out_dir: Path) -> Path:
    """Compile `variant` with `cxx` into `out_dir` (once per source, flags and compiler version); returns
    the library's path. Raises `Unavailable` when compiling fails."""
    flags = (*BASE_FLAGS, *VARIANTS[variant][2])
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30,
                                 check=False).stdout.partition("\n")[0]
    except (OSError, subprocess.SubprocessError) as e:
        raise Unavailable(f"cannot run the C++ compiler {cxx}: {e}") from e
    source = b"".join((KERNELS / name).read_bytes() for name in (*SOURCES, *HEADERS))
    digest = hashlib.sha256(source + " ".join((cxx, version, *flags)).encode()).hexdigest()[:16]
    lib = out_dir / f"qlinear-{variant}-{digest}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".tmp{os.getpid()}.so")
        proc = subprocess.run([cxx, *flags, *(str(KERNELS / s) for s in SOURCES), "-o", str(tmp)], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise Unavailable(f"compiling model/kernels ({variant}) failed: {proc.stderr.strip()[-500:]}")
        tmp.replace(lib)
    return lib


def load():
    """The kernel library (ctypes: `lc_qlinear`, `lc_decode`); raises `Unavailable` when it cannot run
    here. Decided once per process and value of LLAMA_CHAT_KERNEL."""
    found = _entry_point(os.environ.get("LLAMA_CHAT_KERNEL", ""))
    if isinstance(found, Unavailable):
        raise found
    return found


def variant() -> str | None:
    """The variant that runs here (amx, avx512, avxvnni, avx2, neon), or None (see `available`)."""
    try:
        return load().lc_variant().decode()
    except Unavailable:
        return None


@functools.cache
def _entry_point(requested: str):
    """The kernel library for LLAMA_CHAT_KERNEL=`requested`, or the `Unavailable` that says why there is none."""
    try:
        return _build_and_load(requested)
    except Unavailable as e:
        return e


def _build_and_load(requested: str):
    from model.host import find_cxx

    names = pick_variants(requested)
    cxx = find_cxx()
    if cxx is None:
        raise Unavailable("no C++ compiler found (install g++ or clang++)")
    for i, name in enumerate(names):  # a variant that fails to build or start here gives way to the next
        try:
            return _load_variant(name, cxx)
        except Unavailable:
            if i == len(names) - 1:
                raise


def _load_variant(name: str, cxx: str):
    from model.host import app_cache_folder

    lib = build(name, cxx, app_cache_folder() / "kernels")
    try:
        found = ctypes.CDLL(str(lib))
        fn, step, abi, var, ready = found.lc_qlinear, found.lc_decode, found.lc_abi, found.lc_variant, found.lc_ready
    except (OSError, AttributeError) as e:
        lib.unlink(missing_ok=True)  # a damaged or foreign file: built again next time
        raise Unavailable(f"cannot load {lib}: {e}") from e
    var.restype, abi.restype = ctypes.c_char_p, ctypes.c_int
    if abi() != ABI or var() != name.encode():
        lib.unlink(missing_ok=True)
        raise Unavailable(f"{lib} is ABI {abi()} {var().decode()}, not ABI {ABI} {name}; it is rebuilt next time")
    if not ready():
        raise Unavailable(f"the {name} kernel cannot start here (the operating system refuses its registers)")
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
                ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "position", "fp32")] + \
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
