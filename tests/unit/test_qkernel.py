"""The int8/int4 kernel (model/kernels/qlinear.cpp) against the same arithmetic written in PyTorch, in
every variant this CPU runs (the `kernel_variant` fixture; NEON: tests/integration/test_kernels_cross.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.quant import QLinear
from tests.helpers.kernels import int8_activations


@pytest.fixture(autouse=True)
def _variant(kernel_variant):
    return kernel_variant


SHAPES = [(48, 128), (40, 96), (300, 512)]  # (out, in): one tile, a padded tile, many tiles


@pytest.mark.parametrize("bits, group, out_features, in_features", [
    (bits, group, n, k) for bits, group in [(4, 32), (4, 64), (4, 128), (8, None)] for n, k in SHAPES
    if not group or k % group == 0])
@pytest.mark.parametrize("rows", [1, 3, 9, 40])  # 40: the amx variant's tiles of 16 rows, the last one padded
def test_kernel_computes_the_quantized_product(bits, group, out_features, in_features, rows):
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=False)
    q = QLinear.from_linear(linear, bits, group or in_features)
    x = torch.randn(rows, in_features)
    want = int8_activations(x) @ q.dequantized().T
    torch.testing.assert_close(q(x), want, rtol=1e-4, atol=1e-4)
    # and the weights it multiplies by are the layer's, within the quantization step
    step = (linear.weight.abs().amax() / 127) if bits == 8 else (linear.weight.abs().amax() * 2 / 15)
    assert (q.dequantized() - linear.weight).abs().max() <= step / 2 + 1e-3


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
