"""Weight-only quantization for fast CPU decoding, built on PyTorch's own kernels (no extra package).

Modes:
- bf16: no quantization.
- int8: every Linear (and the output layer) int8 per output channel (`aten._weight_int8pack_mm`).
- int4: decoder Linears int4 in groups of 32 (`aten._weight_int4pack_mm_for_cpu`), output layer int8:
  the output layer carries most of the quality loss (llama.cpp keeps it at higher precision too).
- int4-fast: int4 in groups of 128 everywhere, output layer included.

Decoding one token reads every weight once, so fewer bytes per weight is faster decoding on a CPU.
A quantized model is built once per checkpoint and mode and cached; see `model.qcache`.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("bf16", "int8", "int4", "int4-fast")
GROUPS = {"int4": 32, "int4-fast": 128}


class Int8Linear(nn.Module):
    """y = x @ (w_int8 * scale).T, per-output-channel symmetric int8."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        q = cls(linear.in_features, linear.out_features, dtype=linear.weight.dtype, device=w.device)
        q.weight.copy_((w / scales[:, None]).round().clamp(-128, 127).to(torch.int8))
        q.scales.copy_(scales.to(linear.weight.dtype))
        return q

    def forward(self, x):
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.scales.dtype), self.weight, self.scales)
        return y.reshape(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4 in PyTorch's packed CPU layout."""

    def __init__(self, in_features: int, out_features: int, group: int, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros",
                             torch.empty(in_features // group, out_features, 2, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int) -> "Int4Linear":
        n, k = linear.out_features, linear.in_features
        w = linear.weight.detach().float().reshape(n, k // group, group)
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        scales = ((hi - lo) / 15.0).clamp(min=1e-6)
        zeros = lo + scales * 8  # the kernel computes (q - 8) * scale + zero
        q = ((w - lo) / scales).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        out = cls(k, n, group, dtype=linear.weight.dtype, device=w.device)
        out.weight.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        sz = torch.cat([scales.reshape(n, -1, 1), zeros.reshape(n, -1, 1)], dim=2).transpose(0, 1).contiguous()
        out.scales_and_zeros.copy_(sz.to(linear.weight.dtype))
        return out

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.scales_and_zeros.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group, self.scales_and_zeros)
        return y.reshape(*shape[:-1], self.out_features)


def _group_for(k: int, preferred: int) -> int | None:
    """The preferred group size, or the largest smaller one (64, 32) that divides the input size."""
    for g in (preferred, 64, 32):
        if g <= preferred and k % g == 0:
            return g
    return None


def plan(model, mode: str) -> dict[str, tuple]:
    """Which Linear becomes what: {module name: ("int8",) | ("int4", group)}. Layers int4 cannot hold
    (input size not a multiple of 32) stay as they are."""
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "bf16":
        return {}
    head = model.get_output_embeddings()
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        is_head = module is head
        if mode == "int8" or (mode == "int4" and is_head):
            out[name] = ("int8",)
        else:
            g = _group_for(module.in_features, GROUPS[mode])
            out[name] = ("int4", g) if g else ("int8",)
    return out


def _replace(model, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model, mode: str):
    """Quantize `model`'s Linears in place (weights must be real, on the CPU). Returns the plan."""
    layout = plan(model, mode)
    if layout and model.config.tie_word_embeddings:
        model.config.tie_word_embeddings = False  # the output layer gets its own (quantized) copy
    for name, spec in layout.items():
        linear = model.get_submodule(name)
        new = Int8Linear.from_linear(linear) if spec[0] == "int8" else Int4Linear.from_linear(linear, spec[1])
        _replace(model, name, new)
    return layout


def empty_quantized(model, layout: dict[str, tuple], dtype) -> None:
    """Give a meta-device model the quantized modules of `layout` (empty, to be filled by load_state_dict)."""
    if layout and model.config.tie_word_embeddings:
        model.config.tie_word_embeddings = False
    for name, spec in layout.items():
        linear = model.get_submodule(name)
        if spec[0] == "int8":
            new = Int8Linear(linear.in_features, linear.out_features, dtype=dtype, device="meta")
        else:
            new = Int4Linear(linear.in_features, linear.out_features, spec[1], dtype=dtype, device="meta")
        _replace(model, name, new)
