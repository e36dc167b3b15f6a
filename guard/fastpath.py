"""Compute a guard check needs, and no more. A check is a short prefill (conversation + the fixed
closing instruction), so it is compute-bound and these cuts show directly in its latency.

- `LastPositionOnly` wraps a Llama model's final decoder layer: keys and values are still computed for
  every position (the KV cache needs them), but the query, attention output and MLP only for the last
  one, the only position whose output the guard reads. About 1/16 of a check's compute on 16 layers.
- `FusedGateUp` runs a Llama MLP's gate and up projections as one matmul (a check ~2% faster on CPU,
  with the packed weights of model.packed; int8 layers are stacked tile by tile).
"""

from __future__ import annotations

from torch import nn


class LastPositionOnly(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        from model.attention import grouped_attention

        layer, attn = self.layer, self.layer.self_attn
        b, n, _ = hidden_states.shape
        x = layer.input_layernorm(hidden_states)
        k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
        q = attn.q_proj(x[:, -1:]).view(b, 1, -1, attn.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])[0]
        k = apply_rotary_pos_emb(k, k, cos, sin)[1]
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)
        # The last position attends to every cached and new position: no mask needed.
        out, _ = grouped_attention(attn, q, k, v, None, scaling=attn.scaling)  # [b, 1, heads, dim]
        h = hidden_states[:, -1:] + attn.o_proj(out.reshape(b, 1, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))


class FusedGateUp(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        import torch

        from model.quant import QLinear

        gate, up = mlp.gate_proj, mlp.up_proj
        self.size = gate.out_features
        if isinstance(gate, QLinear):  # int8 guard: the two layers' tiles, stacked
            self.gate_up = QLinear.concat([gate, up])
        else:
            self.gate_up = nn.Linear(gate.in_features, 2 * self.size, bias=False, device=gate.weight.device,
                                     dtype=gate.weight.dtype)
            with torch.no_grad():
                self.gate_up.weight.copy_(torch.cat([gate.weight, up.weight]))
        self.down_proj, self.act_fn = mlp.down_proj, mlp.act_fn

    def forward(self, x):
        gate, up = self.gate_up(x).split(self.size, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def optimise_for_checks(model) -> bool:
    """Install both on a Llama model, in place; returns False (and changes nothing) for others."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP

    layers = getattr(model.get_decoder(), "layers", None)
    if not layers or not all(isinstance(layer, LlamaDecoderLayer) for layer in layers):
        return False
    from model.quant import QLinear

    for layer in layers:
        mlp = layer.mlp
        fusable = not isinstance(mlp.gate_proj, QLinear) or mlp.gate_proj.out_features % 16 == 0
        if isinstance(mlp, LlamaMLP) and not getattr(mlp.config, "mlp_bias", False) and fusable:
            layer.mlp = FusedGateUp(mlp)
    layers[-1] = LastPositionOnly(layers[-1])
    return True

