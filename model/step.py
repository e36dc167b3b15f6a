"""One decode step of a Llama model without transformers' generic forward (eager decoding).

transformers' forward serves every shape of call: masks, position ids, output records, hooks. For one
new token it ran ~2,500 PyTorch ops a token on the 1B shape, ~7 ms of a 29 ms int4 step on this 2-core
CPU. `LlamaStep` calls the same modules and functions in the same order on the same tensors, so its
logits are the forward's bit for bit, and skips the rest. `NativeStep` runs the decoder layers in one
call of the kernel library (model.qkernel), in bf16 or fp32.
"""

from __future__ import annotations

import weakref

from model.growing import growing_layer_type


class LlamaStep:
    """`step(x, cache)`: the logits [vocab] of one token `x` ([1, 1] ids) after what `cache` holds."""

    def __init__(self, model):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import rotate_half

        self.model, self.inner = model, model.model
        self.attention = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]
        self.rotate_half = rotate_half

    @staticmethod
    def supports(model) -> bool:
        """transformers' Llama layers as they come (the guard swaps some for its own: not those), with
        attention that needs no mask for one query (SDPA, grouped)."""
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

        from model.attention import NAME

        config, inner = model.config, getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        return (config.model_type == "llama" and config._attn_implementation in ("sdpa", NAME)
                and getattr(config, "pretraining_tp", 1) == 1 and layers is not None
                and all(type(layer) is LlamaDecoderLayer and type(layer.self_attn) is LlamaAttention
                        for layer in layers))

    def __call__(self, x, cache):
        import torch

        inner = self.inner
        h = inner.embed_tokens(x)
        position = torch.tensor([[cache.get_seq_length()]], device=x.device)
        cos, sin = inner.rotary_emb(h, position_ids=position)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer in inner.layers[: self.model.config.num_hidden_layers]:
            attn = layer.self_attn
            residual = h
            h = layer.input_layernorm(h)
            q, k, v = (proj(h).view(1, 1, -1, attn.head_dim).transpose(1, 2)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            q = (q * cos) + (self.rotate_half(q) * sin)  # transformers' apply_rotary_pos_emb
            k = (k * cos) + (self.rotate_half(k) * sin)
            k, v = cache.update(k, v, attn.layer_idx)
            out, _ = self.attention(attn, q, k, v, None, dropout=0.0, scaling=attn.scaling)
            h = residual + attn.o_proj(out.reshape(1, 1, -1).contiguous())
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(inner.norm(h))[0, -1]


HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128, 256)  # lc_decode's attention (model/kernels/decode.cpp attend_for)


class NativeStep(LlamaStep):
    """The decoder layers of a step in one call of the kernel library (`lc_decode` in
    model/kernels/decode.cpp) when every projection is a `QLinear` and activations are bf16 or fp32: no
    PyTorch op between the layers' matmuls. Embedding, final norm and output layer stay the modules'; the
    rotary embedding's rows come from a table (`rotary`)."""

    def __init__(self, model):
        import torch

        from model.qkernel import DecodeLayer, DecodeShape, load

        super().__init__(model)
        config, layers = model.config, self.inner.layers[: model.config.num_hidden_layers]
        self.lib = load()
        attn0 = layers[0].self_attn
        self.shape = DecodeShape(layers=len(layers), hidden=config.hidden_size, heads=config.num_attention_heads,
                                 kv_heads=config.num_key_value_heads, head_dim=attn0.head_dim,
                                 intermediate=config.intermediate_size, position=0,
                                 fp32=int(model.dtype == torch.float32), eps=config.rms_norm_eps, scale=attn0.scaling)
        self.layers = (DecodeLayer * len(layers))()
        self.kv_like = torch.empty(1, config.num_key_value_heads, 0, attn0.head_dim, dtype=model.dtype)
        self.held = []  # weak references to the key buffers whose addresses `self.layers` holds
        self._table = None  # cos and sin for positions 0.. (see rotary)
        self._rows = None  # the last position's cos and sin, where there is no table
        for spec, layer in zip(self.layers, layers):
            attn, mlp = layer.self_attn, layer.mlp
            spec.attn_norm = layer.input_layernorm.weight.data_ptr()
            spec.mlp_norm = layer.post_attention_layernorm.weight.data_ptr()
            for name, linear in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj),
                                 ("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)):
                m = getattr(spec, name)
                m.data, m.group, m.bits, m.n = linear.packed.data_ptr(), linear.group, linear.bits, linear.out_features

    @staticmethod
    def supports(model) -> bool:
        """A Llama model on the CPU in bf16 or fp32 whose decoder projections are all `QLinear`, with SiLU."""
        import torch
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        from model.quant import QLinear

        if (not LlamaStep.supports(model) or model.dtype not in (torch.bfloat16, torch.float32)
                or model.device.type != "cpu"):
            return False
        config = model.config
        for layer in model.model.layers[: config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            if type(mlp) is not LlamaMLP:
                return False
            projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            if not all(type(p) is QLinear and not p.float_out for p in projections):
                return False
            if not all(type(n) is LlamaRMSNorm for n in (layer.input_layernorm, layer.post_attention_layernorm)):
                return False
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, attn.head_dim
        return (config.hidden_act == "silu" and config.hidden_size % 32 == 0 and config.intermediate_size % 32 == 0
                and head_dim in HEAD_DIMS and heads % kv_heads == 0)  # lc_decode's shapes

    def __call__(self, x, cache):
        import torch

        layers = cache.layers[: self.shape.layers]
        if not all(isinstance(layer, growing_layer_type()) for layer in layers):
            return super().__call__(x, cache)
        n = cache.get_seq_length()
        buffers = [layer.reserve(n + 1, self.kv_like) for layer in layers]
        if len(self.held) != len(buffers) or any(ref() is not b[0] for ref, b in zip(self.held, buffers)):
            self.held = [weakref.ref(b[0]) for b in buffers]  # weak: a dropped cache's memory is freed
            for spec, (keys, values) in zip(self.layers, buffers):
                spec.keys, spec.values, spec.capacity = keys.data_ptr(), values.data_ptr(), keys.shape[-2]
        h = self.inner.embed_tokens(x).contiguous()
        cos, sin = self.rotary(h, n)
        self.shape.position = n
        status = self.lib.lc_decode(h.data_ptr(), self.layers, self.shape, cos, sin, torch.get_num_threads())
        if status != 0:
            raise ValueError("lc_decode: the model's shapes do not fit the kernel")
        for layer in layers:
            layer.advance(n + 1)
        return self.model.lm_head(self.inner.norm(h))[0, -1]

    def rotary(self, h, n: int) -> tuple[int, int]:
        """Addresses of position n's cos and sin rows. Where the rotary embedding does not depend on the
        sequence's length (all but dynamic RoPE types), its rows come from a table made by the same module
        for a range of positions (the same values as one position at a time), so a step runs no PyTorch op
        for them: each op gives the GIL up and waits to take it back, behind a UI thread drawing."""
        import torch

        rope = self.inner.rotary_emb
        if rope.rope_type not in STATIC_ROPE:
            cos, sin = rope(h, position_ids=torch.tensor([[n]]))
            self._rows = cos.contiguous(), sin.contiguous()  # held until lc_decode has read them
            return self._rows[0].data_ptr(), self._rows[1].data_ptr()
        if self._table is None or n >= self._table[0].shape[1]:
            positions = max(ROPE_TABLE, 2 * (n + 1))
            self._table = tuple(t.contiguous() for t in rope(h, position_ids=torch.arange(positions)[None]))
        row = self._table[0].shape[-1] * self._table[0].element_size()
        return self._table[0].data_ptr() + n * row, self._table[1].data_ptr() + n * row


STATIC_ROPE = ("default", "llama3", "linear")  # rope types whose cos/sin at a position depend on nothing else
ROPE_TABLE = 1024  # positions in the first table (it doubles past them)


def eager_step(model):
    """The fastest eager decode step `model` supports, or None (transformers' forward)."""
    from model.qkernel import Unavailable

    if NativeStep.supports(model):
        try:
            return NativeStep(model)
        except Unavailable:  # the kernel library cannot load: the modules' step still works
            pass
    return LlamaStep(model) if LlamaStep.supports(model) else None
