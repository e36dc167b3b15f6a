"""Which kernel variant a CPU gets (model.qkernel.pick_variant), the LLAMA_CHAT_KERNEL override, and the
ABI check on the built library."""

from __future__ import annotations

import pytest

from model import qkernel
from model.qkernel import Unavailable, pick_variant

ZEN4 = {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}
ZEN3 = {"avx2", "fma", "f16c"}
ALDER_LAKE = {"avx2", "fma", "f16c", "avx_vnni"}  # Intel's 12th generation: AVX-VNNI without AVX-512
SAPPHIRE_RAPIDS = ZEN4 | {"avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}
GRAVITON = {"fp", "asimd", "asimddp", "i8mm"}


def test_the_fastest_variant_the_cpu_has():
    assert pick_variant("", "x86_64", ZEN4) == "avx512"
    assert pick_variant("", "x86_64", ZEN3) == "avx2"
    assert pick_variant("", "x86_64", ALDER_LAKE) == "avxvnni"
    assert pick_variant("", "x86_64", ZEN4 | {"avx_vnni"}) == "avx512"  # Zen 5 has both
    assert pick_variant("", "x86_64", SAPPHIRE_RAPIDS) == "amx"
    assert pick_variant("", "x86_64", ZEN4 | {"amx_tile"}) == "avx512"  # tiles without their int8 products
    assert pick_variant("", "aarch64", GRAVITON) == "neon"
    with pytest.raises(Unavailable, match="needs AVX2 \\+ FMA, AVX512-VNNI or NEON"):
        pick_variant("", "x86_64", {"sse4_2", "avx"})
    with pytest.raises(Unavailable, match="none of the kernels"):
        pick_variant("", "aarch64", {"fp", "asimd"})  # Cortex-A72 (Raspberry Pi 4): no dot product


def test_the_override_forces_a_variant_the_cpu_has():
    assert pick_variant("avx2", "x86_64", ZEN4) == "avx2"  # every AVX-512 machine tests both x86 variants
    assert pick_variant("AVX512", "x86_64", ZEN4) == "avx512"
    assert pick_variant("avx2", "x86_64", ALDER_LAKE) == "avx2"
    assert pick_variant("avx512", "x86_64", SAPPHIRE_RAPIDS) == "avx512"
    with pytest.raises(Unavailable, match="LLAMA_CHAT_KERNEL=amx asks for the amx kernel, but this CPU lacks amx_tile, amx_int8"):
        pick_variant("amx", "x86_64", ZEN4)
    with pytest.raises(Unavailable, match="LLAMA_CHAT_KERNEL=avxvnni asks for the avxvnni kernel, but this CPU lacks avx_vnni"):
        pick_variant("avxvnni", "x86_64", ZEN3)
    with pytest.raises(Unavailable, match="LLAMA_CHAT_KERNEL=avx512 asks for the avx512 kernel, but this CPU lacks avx512f"):
        pick_variant("avx512", "x86_64", ZEN3)
    with pytest.raises(Unavailable, match="but this is a x86_64 CPU"):
        pick_variant("neon", "x86_64", ZEN4)
    with pytest.raises(Unavailable, match="asks for PyTorch's kernels"):
        pick_variant("torch", "x86_64", ZEN4)
    with pytest.raises(Unavailable, match="LLAMA_CHAT_KERNEL=sse is not a kernel: use amx, avx512, avxvnni, avx2, neon or torch"):
        pick_variant("sse", "x86_64", ZEN4)


def test_a_library_of_another_abi_is_refused_and_deleted(kernel_variant, monkeypatch, tmp_path):
    from model.host import app_cache_folder

    monkeypatch.setenv("LLAMA_CHAT_HOME", str(tmp_path / "own"))  # a kernels folder of its own, not the shared one
    built_for = qkernel.ABI
    qkernel._entry_point.cache_clear()
    monkeypatch.setattr(qkernel, "ABI", built_for + 1)
    try:
        why = qkernel.available()
        assert f"is ABI {built_for} {kernel_variant}, not ABI {built_for + 1} {kernel_variant}" in why
        assert not list((app_cache_folder() / "kernels").glob("*.so"))  # built again next time
    finally:
        qkernel._entry_point.cache_clear()


def test_a_variant_the_compiler_cannot_build_gives_way_to_the_next(monkeypatch, tmp_path):
    from tests.conftest import native_variants

    runs = native_variants()
    if not runs:
        pytest.skip("no native kernel variant runs on this CPU")
    arch = qkernel.VARIANTS[runs[0]][0]
    # a faster variant this CPU has (no flags needed) whose compiler flag the compiler does not know
    broken = {"future": (arch, (), ("-DLC_AVX2", "-mno-such-instruction-set")), **qkernel.VARIANTS}
    monkeypatch.setattr(qkernel, "VARIANTS", broken)
    monkeypatch.setenv("LLAMA_CHAT_HOME", str(tmp_path))
    monkeypatch.delenv("LLAMA_CHAT_KERNEL", raising=False)
    qkernel._entry_point.cache_clear()
    try:
        assert qkernel.variant() == runs[0]
        monkeypatch.setenv("LLAMA_CHAT_KERNEL", "future")  # asked for by name: no other one instead
        assert "compiling model/kernels (future) failed" in qkernel.available()
    finally:
        qkernel._entry_point.cache_clear()


@pytest.mark.parametrize("bits, group", [(4, 32), (4, 128), (8, 512)])
def test_amx_tiles_give_the_vnni_result_bit_for_bit(bits, group, monkeypatch):
    """The amx variant's prompt rows (16 and more) multiply on the tile unit with the same integer sums and
    the same floating-point steps as avx512's VNNI path: its results are avx512's exactly."""
    import torch
    from torch import nn

    from model.quant import QLinear
    from tests.conftest import native_variants

    if "amx" not in native_variants():
        pytest.skip("this CPU has no AMX-INT8 (the amx variant is compared with avx512 where it runs)")
    torch.manual_seed(0)
    q = QLinear.from_linear(nn.Linear(512, 80, bias=False), bits, group)
    x = torch.randn(37, 512)
    monkeypatch.setenv("LLAMA_CHAT_KERNEL", "amx")
    amx = q(x)
    monkeypatch.setenv("LLAMA_CHAT_KERNEL", "avx512")
    assert torch.equal(amx, q(x))


# A process whose thread has a small alternate signal stack: Linux refuses it the AMX tile registers
# (arch_prctl ARCH_REQ_XCOMP_PERM fails with ENOSPC, the signal frame would not fit).
SMALL_SIGALTSTACK = """
import ctypes, os
class Stack(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(4096)
assert ctypes.CDLL(None).sigaltstack(ctypes.byref(Stack(ctypes.cast(buf, ctypes.c_void_p), 0, 4096)), None) == 0
from model import qkernel
print(qkernel.variant())
os.environ["LLAMA_CHAT_KERNEL"] = "amx"
print(qkernel.available())
"""


def test_a_variant_that_cannot_start_gives_way_to_the_next():
    """The amx variant builds, but Linux must grant the tile registers (lc_ready): in a process it refuses
    them to, the avx512 variant runs, and amx asked for by name says why it does not."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import native_variants

    if "amx" not in native_variants():
        pytest.skip("this CPU has no AMX-INT8")
    out = subprocess.run([sys.executable, "-c", SMALL_SIGALTSTACK], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2], timeout=300).stdout.splitlines()
    assert out == ["avx512", "the amx kernel cannot start here (the operating system refuses its registers)"]
