"""Linear layers whose weights oneDNN has reordered once, at load time, into its blocked layout (CPU).

A plain bf16 `nn.Linear` on the CPU hands oneDNN a row-major weight on every call, and oneDNN reorders
it before multiplying: for a guard check's ~80 rows that costs ~12% of the matmul, for a single decode
row about a third (2048x16384, 2 threads: 14.5 -> 12.9 ms at 80 rows, 3.2 -> 2.2 ms at one row). A plain
fp32 Linear goes to a BLAS that ran about half as fast here (54 -> 25 ms at 80 rows). Reordering once
removes that. bf16 results matched the plain layer's bit for bit in our checks; fp32 ones differ by rounding.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

SIZE_HINT = 128  # the row count oneDNN picks its blocking for; best here for both checks and decoding


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        _register_compilable_op()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), SIZE_HINT)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x):
        if torch.compiler.is_compiling():
            return torch.ops.llama_chat.packed_linear(x, self.weight, self.bias, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


@functools.cache
def _register_compilable_op() -> None:
    """`torch.ops.llama_chat.packed_linear`: the same product as a custom op, which torch.compile calls
    as it is (inductor's own lowering of `_linear_pointwise` only takes weights it packed itself)."""

    @torch.library.custom_op("llama_chat::packed_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias, int out_features) -> Tensor")
    def packed_linear(x, weight, bias, out_features):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @packed_linear.register_fake
    def _(x, weight, bias, out_features):
        return x.new_empty((*x.shape[:-1], out_features))


def can_pack(weight) -> bool:
    """oneDNN on the CPU, in fp32 or in bf16 the CPU computes natively."""
    from model.device import cpu_has_native_bf16

    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and cpu_has_native_bf16())


def pack_linears(module: nn.Module) -> int:
    """Replace every plain `nn.Linear` inside `module` whose weight `can_pack` with a `PackedLinear`, in
    place; returns how many were replaced. Subclasses (quantized layers, say) keep their own forward."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and can_pack(child.weight):
                try:
                    setattr(parent, name, PackedLinear(child))
                except (RuntimeError, NotImplementedError):  # a oneDNN build without it: stay plain
                    return count
                count += 1
    return count
