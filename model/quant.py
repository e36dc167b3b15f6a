"""Quantized weights for fast CPU decoding.

Modes:
- bf16: no quantization.
- int8: every Linear (and the output layer) int8 per output channel.
- int4: decoder Linears int4 in groups of 32. The output layer carries most of the quality loss
  (llama.cpp keeps it at higher precision too): where the native kernel runs it is a `ShortlistHead`
  (every logit from int4 weights, the highest ones again from int8 weights: the output layer streams
  half the bytes a token, and the tokens that can be picked keep int8 weights' logits), else int8.
- int4-fast: int4 in groups of 128 everywhere, output layer included.

Decoding one token reads every weight once, so fewer bytes per weight is faster decoding on a CPU.
Two kernels: `QLinear` (model.qkernel: int8 activations x int8/int4 weights with integer dot products on
AVX512-VNNI, AVX2 or NEON, the fast one) where it runs, else PyTorch's weight-only kernels (`Int8Linear`,
`Int4Linear`: bf16 activations, `aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu`).
`kernel()` says which.
A quantized model is built once per checkpoint, mode and kernel and cached; see `model.qcache`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from model import QUANTIZE_MODES
from model.qkernel import available, qlinear

MODES = tuple(m for m in QUANTIZE_MODES if m != "auto")  # "auto" is resolved first (model.device.pick_quantize)
GROUPS = {"int4": 32, "int4-fast": 128}
HEAD_GROUP = 128  # ShortlistHead's int4 weights: 139 MB for the 1B shape's output layer (int8: 263 MB)
SHORTLIST = 128  # logits per row ShortlistHead takes again from its int8 weights
ROWS_AT_ONCE = 256  # QLinear.from_linear; a multiple of the kernel's tiles of 16 rows


def kernel() -> str:
    """"native" (model.qkernel, whichever variant runs) where it runs, else "torch"."""
    return "native" if available() is None else "torch"


class QLinear(nn.Module):
    """int8 or int4 weights for model.qkernel: w = scale * code + offset per group of `group` inputs
    (int8: one group per row, codes q + 128), output rows padded to tiles of 16, codes, scales and offsets
    in one buffer, `packed` (layout: qlinear.cpp; `pack_tiles`).
    `float_out`: results in fp32 whatever the input (the output layer: logits are argmaxed or sampled in
    fp32, and a bf16 argmax over 128k logits cost 0.46 ms a token here, fp32 0.14)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group: int, device=None,
                 float_out: bool = False):
        super().__init__()
        _register_compilable_op()
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        self.float_out = float_out
        rows, row_bytes = -(-out_features // 16) * 16, in_features * bits // 8 + 4 * (in_features // group)
        self.register_buffer("packed", torch.empty(rows, row_bytes, dtype=torch.uint8, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group: int, float_out: bool = False) -> "QLinear":
        n, k = linear.out_features, linear.in_features
        out = cls(k, n, bits, group, device=linear.weight.device, float_out=float_out)
        # A few tiles of rows at a time: their fp32 copies stay in the CPU's caches. Whole matrices at
        # once took 5.8 s for the 1B shape's output layer here, and most of a first start.
        for r0 in range(0, n, ROWS_AT_ONCE):
            w = linear.weight[r0:r0 + ROWS_AT_ONCE].detach().float()
            part = pack_tiles(*_quantize_rows(w.reshape(len(w), k // group, group), bits), bits)
            out.packed[r0:r0 + len(part)].copy_(part)
        return out

    def forward(self, x):
        args = (x, self.packed, self.group, self.bits, self.out_features, self.float_out)
        if torch.compiler.is_compiling():
            return torch.ops.llama_chat.qlinear(*args)
        return qlinear(*args)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, group={self.group}"
                + (", float_out" if self.float_out else ""))

    def dequantized(self, rows=None):
        """The weights this layer multiplies by, fp32 [len(rows) or out_features, in_features]: all its rows,
        or only `rows`, unpacked from the tile layout (`pack_tiles`)."""
        k, groups = self.in_features, self.in_features // self.group
        wanted = torch.arange(self.out_features) if rows is None else torch.as_tensor(list(rows))
        tiles, inverse = torch.unique(wanted // 16, return_inverse=True)
        by_group = self.packed.reshape(-1, groups, self.packed.numel() // (len(self.packed) // 16 * groups))[tiles]
        codes = by_group[:, :, :-64].reshape(len(tiles), k // 32, -1, 16, 4)  # tile, block, vector, row, input
        if self.bits == 4:
            codes = torch.cat([codes & 0x0F, codes >> 4], dim=2)
        codes = codes.permute(0, 3, 1, 2, 4).reshape(len(tiles), 16, k).float()
        words = by_group[:, :, -64:].reshape(len(tiles), groups, 16, 2, 2).permute(0, 2, 1, 3, 4)  # tile, row, group
        scale, offset = (words[..., i, :].contiguous().view(torch.bfloat16).float().reshape(len(tiles), 16, groups)
                         .repeat_interleave(self.group, dim=2) for i in (0, 1))
        return (codes * scale + offset)[inverse, wanted % 16]

    @classmethod
    def concat(cls, parts: list["QLinear"]) -> "QLinear":
        """One layer whose outputs are `parts`' outputs side by side (their weights share an input): tiles
        are whole rows, so their packed buffers are stacked. Each part's rows must fill whole tiles."""
        first = parts[0]
        if any((p.in_features, p.bits, p.group, p.float_out) != (first.in_features, first.bits, first.group, first.float_out)
               or p.out_features % 16 for p in parts):
            raise ValueError("only layers alike in input, bits, group and output, with whole tiles of rows, concatenate")
        out = cls(first.in_features, sum(p.out_features for p in parts), first.bits, first.group, device="meta",
                  float_out=first.float_out)
        out.packed = _back_to_back([p.packed for p in parts])
        return out


class ShortlistHead(nn.Module):
    """An output layer in two passes: every logit from int4 weights (`coarse`, group HEAD_GROUP: the bytes
    each token streams), then the SHORTLIST highest of each row again from int8 weights with a bf16 scale
    per 32 inputs (`codes`, `scales`), the activations unrounded. Greedy decoding, top-k and top-p sampling
    pick among tokens whose logits are closer than an int8 layer's (no int8 activations, finer scales): an
    int4 logit is off by a few hundredths to tenths, far less than the gap between the highest few and the
    128th. The other logits stay the int4 ones. A token streams 139 MB of weights (1B shape) instead of the
    263 of an int8 output layer; the int8 copy is read a few rows at a time."""

    def __init__(self, in_features: int, out_features: int, group: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.coarse = QLinear(in_features, out_features, 4, group, device=device, float_out=True)
        self.register_buffer("codes", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, in_features // 32, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int) -> "ShortlistHead":
        n, k = linear.out_features, linear.in_features
        out = cls(k, n, group, device="meta")
        out.coarse = QLinear.from_linear(linear, 4, group, float_out=True)
        out.codes, out.scales = torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // 32, dtype=torch.bfloat16)
        for r0 in range(0, n, ROWS_AT_ONCE):  # as QLinear.from_linear
            w = linear.weight[r0:r0 + ROWS_AT_ONCE].detach().float().reshape(-1, k // 32, 32)
            scales = (w.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-8).bfloat16()
            out.codes[r0:r0 + len(w)] = (w / scales.float()).round_().clamp_(-127, 127).reshape(len(w), k).to(torch.int8)
            out.scales[r0:r0 + len(w)] = scales[..., 0]
        return out

    def _rows(self, rows):
        """fp32 weights of `rows` (a 1-D index tensor), [len(rows), in_features]."""
        codes = self.codes.index_select(0, rows).view(len(rows), -1, 32).float()
        return (codes * self.scales.index_select(0, rows).float().unsqueeze(-1)).view(len(rows), self.in_features)

    def forward(self, x):
        logits = self.coarse(x)
        top = logits.topk(min(SHORTLIST, self.out_features), dim=-1, sorted=False).indices
        rows = self._rows(top.reshape(-1)).view(-1, top.shape[-1], self.in_features)
        exact = torch.bmm(rows, x.float().reshape(-1, self.in_features, 1)).view(top.shape)
        return logits.scatter_(-1, top, exact)

    def dequantized(self, rows=None):
        """The int8 weights of all the layer's rows, or of `rows` (fp32), as QLinear.dequantized."""
        return self._rows(torch.arange(self.out_features) if rows is None else torch.as_tensor(list(rows)))


def _back_to_back(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors stacked along their first dimension: a view where they already lie one after the other
    in one buffer (layers read from the quantized cache, whose gate and up projections are stored so), else
    a copy. The view keeps the buffer's bytes counted once (a copy of an int8 guard's gate and up layers
    held a third of its weights twice)."""
    first = tensors[0]
    storage, offset, rows = first.untyped_storage(), first.storage_offset(), 0
    for t in tensors:
        if not (t.is_contiguous() and t.shape[1:] == first.shape[1:]
                and t.untyped_storage().data_ptr() == storage.data_ptr()
                and t.storage_offset() == offset + rows * first.stride(0)):
            return torch.cat(tensors)
        rows += len(t)
    return first.new_empty(0).set_(storage, offset, (rows, *first.shape[1:]))


def _quantize_rows(w, bits: int):
    """Codes [N, K] and scales/offsets [N, K/G] (exact in bf16) for fp32 weights w [N, K/G, G]."""
    n = len(w)
    if bits == 8:
        scales = (w.abs().amax(dim=(1, 2)) / 127.0).clamp(min=1e-8).bfloat16().float().reshape(n, 1, 1)
        q = (w / scales).round_().clamp_(-127, 127).add_(128)
        offsets = -128 * scales
    else:
        offsets = w.amin(dim=-1, keepdim=True).bfloat16().float()
        scales = ((w.amax(dim=-1, keepdim=True) - offsets) / 15.0).clamp(min=1e-6).bfloat16().float()
        q = (w - offsets).div_(scales).round_().clamp_(0, 15)
    return q.reshape(n, -1), scales.reshape(n, -1), offsets.reshape(n, -1)


def pack_tiles(q, scales, offsets, bits: int):
    """Codes q [N, K] (unsigned) and per-group scales/offsets [N, K/G] in qlinear.cpp's layout, as uint8
    [N padded to 16, K * bits / 8 + 4 * K/G]: per tile of 16 rows and group, the group's blocks of 32
    inputs as 8 vectors of (row, 4 inputs) bytes (4 bit: two inputs 16 apart share a byte), then one
    32-bit word per row, bf16 scale | bf16 offset << 16."""
    n, k = q.shape
    pad, groups = -n % 16, scales.shape[1]
    if pad:
        q, scales, offsets = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (q, scales, offsets))
    tiles = (n + pad) // 16
    codes = q.to(torch.uint8).reshape(tiles, 16, k // 32, 8, 4).permute(0, 2, 3, 1, 4)  # tile, block, quad, row, i
    if bits == 4:
        codes = codes[:, :, :4] | (codes[:, :, 4:] << 4)
    words = torch.stack([scales.bfloat16(), offsets.bfloat16()], dim=-1).view(torch.uint8)  # [rows, groups, 4]
    words = words.reshape(tiles, 16, groups, 4).transpose(1, 2).reshape(tiles, groups, 64)
    packed = torch.cat([codes.reshape(tiles, groups, -1), words], dim=2)  # little-endian: scale in the low half
    return packed.reshape(n + pad, -1)


@functools.cache
def _register_compilable_op() -> None:
    """`torch.ops.llama_chat.qlinear`: the kernel as an op torch.compile calls as it is."""

    @torch.library.custom_op("llama_chat::qlinear", mutates_args=(),
                             schema="(Tensor x, Tensor packed, int group, int bits, int out_features, "
                                    "bool float_out) -> Tensor")
    def op(x, packed, group, bits, out_features, float_out):
        return qlinear(x, packed, group, bits, out_features, float_out)

    @op.register_fake
    def _(x, packed, group, bits, out_features, float_out):
        dtype = x.dtype if x.dtype == torch.bfloat16 and not float_out else torch.float32
        return x.new_empty((*x.shape[:-1], out_features), dtype=dtype)


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
    """Which Linear becomes what: {module name: ("int8",) | ("int4", group) | ("shortlist", group)}. Layers
    int4 cannot hold (input size not a multiple of 32) stay as they are."""
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
        if mode == "int4" and is_head and (g := _group_for(module.in_features, HEAD_GROUP)):
            out[name] = ("shortlist", g)  # a ShortlistHead where the native kernel runs, else int8
        elif mode == "int8" or (mode == "int4" and is_head):
            out[name] = ("int8",)
        else:
            g = _group_for(module.in_features, GROUPS[mode])
            out[name] = ("int4", g) if g else ("int8",)
    return out


def _replace(model, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model, mode: str, kernel_name: str | None = None, progress=None):
    """Quantize `model`'s Linears in place (weights must be real, on the CPU) for `kernel_name` (default:
    `kernel()`). Returns the plan. `progress(done, total)` hears after each Linear."""
    layout = plan(model, mode)
    _swap_linears(model, layout, kernel_name or kernel(), empty_dtype=None, progress=progress)
    return layout


def empty_quantized(model, layout: dict[str, tuple], dtype, kernel_name: str) -> None:
    """Give a meta-device model the quantized modules of `layout` for `kernel_name` (empty, to be filled
    by load_state_dict)."""
    _swap_linears(model, layout, kernel_name, empty_dtype=dtype)


def _swap_linears(model, layout: dict[str, tuple], kernel_name: str, empty_dtype, progress=None) -> None:
    """Replace the Linears of `layout` with quantized modules: built from their weights, or empty on the
    meta device when `empty_dtype` is given."""
    if layout and model.config.tie_word_embeddings:
        model.config.tie_word_embeddings = False  # the output layer gets its own (quantized) copy
    head = model.get_output_embeddings()
    for done, (name, spec) in enumerate(layout.items()):
        if progress is not None:
            progress(done, len(layout))
        linear = model.get_submodule(name)
        k, n = linear.in_features, linear.out_features
        if spec[0] == "shortlist" and kernel_name == "native":
            new = ShortlistHead(k, n, spec[1], device="meta") if empty_dtype else ShortlistHead.from_linear(linear, spec[1])
        elif kernel_name == "native" and k % 32 == 0:
            bits, group = (8, k) if spec[0] == "int8" else (4, spec[1])
            new = (QLinear(k, n, bits, group, device="meta", float_out=linear is head) if empty_dtype
                   else QLinear.from_linear(linear, bits, group, float_out=linear is head))
        elif spec[0] in ("int8", "shortlist"):
            new = Int8Linear(k, n, dtype=empty_dtype, device="meta") if empty_dtype else Int8Linear.from_linear(linear)
        else:
            new = (Int4Linear(k, n, spec[1], dtype=empty_dtype, device="meta") if empty_dtype
                   else Int4Linear.from_linear(linear, spec[1]))
        _replace(model, name, new)
