"""Attention for one new token at a time.

PyTorch's CPU flash-attention kernel is built for many queries; with the single query of a decode step
it spends ~3 ms per layer at 1.6k tokens of context, where the work is ~13 MFLOP. Two small batched
matmuls with the query heads grouped per key/value head (no repeat of K/V) do the same in a fraction
of that. Prefill (many queries) keeps transformers' SDPA path.
"""

from __future__ import annotations

NAME = "llama_chat_decode"


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query [B, H, q, D], key/value [B, KvH, n, D] -> ([B, q, H, D], None), as transformers expects."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or b != 1 or (attention_mask is not None and attention_mask.dtype != torch.bool):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else dim ** -0.5
    q = query.reshape(b, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [B, KvH, group, n]
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask.reshape(b, 1, 1, -1)[..., : scores.shape[-1]], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, KvH, group, D]
    return out.reshape(b, heads, 1, dim).transpose(1, 2), None


def use_decode_attention(model) -> bool:
    """Switch a transformers model that uses SDPA to `decode_attention`; returns whether it did."""
    from transformers import AttentionInterface

    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, decode_attention)
    model.set_attn_implementation(NAME)
    return True
