"""The VNNI int8/int4 kernel (model/kernels/qlinear.cpp) against the same arithmetic written in PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.qkernel import available
from model.quant import QLinear


@pytest.fixture(autouse=True)
def _kernel():
    if why := available():
        pytest.skip(why)


def dequantized(q: QLinear) -> torch.Tensor:
    """The weights `q` multiplies by, [out, in] in fp32, unpacked from the tiled layout."""
    rows, k, groups = q.packed.shape[0], q.in_features, q.in_features // q.group
    by_group = q.packed.reshape(rows // 16, groups, -1)  # tile, group: codes, then a word per row
    codes = by_group[:, :, :-64].reshape(rows // 16, k // 32, -1, 16, 4)  # tile, block, vector, row, input
    if q.bits == 4:
        codes = torch.cat([codes & 0x0F, codes >> 4], dim=2)
    codes = codes.permute(0, 3, 1, 2, 4).reshape(rows, k).float()
    words = by_group[:, :, -64:].reshape(rows // 16, groups, 16, 2, 2).permute(0, 2, 1, 3, 4)  # tile, row, group
    scales, offsets = (words[..., i, :].contiguous().view(torch.bfloat16).float().reshape(rows, groups)
                       .repeat_interleave(q.group, dim=1) for i in (0, 1))
    return (codes * scales + offsets)[: q.out_features]


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernel rounds it: int8 per block of 32 with scale max|x| / 127."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / torch.where(d > 0, d, 1)) * d).reshape(x.shape)


SHAPES = [(48, 128), (40, 96), (300, 512)]  # (out, in): one tile, a padded tile, many tiles


@pytest.mark.parametrize("bits, group, out_features, in_features", [
    (bits, group, n, k) for bits, group in [(4, 32), (4, 64), (4, 128), (8, None)] for n, k in SHAPES
    if not group or k % group == 0])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_kernel_computes_the_quantized_product(bits, group, out_features, in_features, rows):
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=False)
    q = QLinear.from_linear(linear, bits, group or in_features)
    x = torch.randn(rows, in_features)
    want = int8_activations(x) @ dequantized(q).T
    torch.testing.assert_close(q(x), want, rtol=1e-4, atol=1e-4)
    # and the weights it multiplies by are the layer's, within the quantization step
    step = (linear.weight.abs().amax() / 127) if bits == 8 else (linear.weight.abs().amax() * 2 / 15)
    assert (dequantized(q) - linear.weight).abs().max() <= step / 2 + 1e-3


def test_bf16_in_bf16_out_and_leading_dims():
    torch.manual_seed(0)
    q = QLinear.from_linear(nn.Linear(256, 64, bias=False), 4, 32)
    x = torch.randn(2, 5, 256)
    y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 64)
    torch.testing.assert_close(y.float(), q(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_compiled_calls_the_same_kernel():
    torch.manual_seed(0)
    q = QLinear.from_linear(nn.Linear(128, 48, bias=False), 4, 32)
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    compiled = torch.compile(lambda t: q(t) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), q(x) * 2, rtol=0, atol=0)
