"""oneDNN-packed Linear layers: the same product as nn.Linear, eagerly and under torch.compile."""

import pytest
import torch
from torch import nn

from model.device import cpu_has_native_bf16
from model.packed import PackedLinear, pack_linears

DTYPES = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_linear_computes_what_linear_computes(dtype):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 96, bias=False), nn.SiLU(), nn.Linear(96, 48)).to(dtype)
    packed = nn.Sequential(*[PackedLinear(m) if type(m) is nn.Linear else m for m in plain])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with torch.inference_mode():
        for rows in (1, 7, 80):
            x = torch.randn(1, rows, 64, dtype=dtype)
            torch.testing.assert_close(packed(x), plain(x), **tol)
        compiled = torch.compile(packed, fullgraph=True)  # the custom op: no graph break, same product
        torch.testing.assert_close(compiled(x), plain(x), **tol)


def test_pack_linears_replaces_plain_linears_only_where_onednn_runs():
    class Scaled(nn.Linear):  # a subclass (e.g. a quantized layer) keeps its own forward
        pass

    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 16), Scaled(16, 16))
    assert pack_linears(model) == 1
    assert isinstance(model[1], PackedLinear) and type(model[2]) is Scaled
    assert pack_linears(nn.Sequential(nn.Linear(4, 4).to(torch.float16))) == 0
    assert pack_linears(nn.Sequential(nn.Linear(4, 4, device="meta"))) == 0
