"""Attention for a few new tokens at a time: decode steps and guard checks.

PyTorch's CPU flash-attention kernel is built for long query blocks. With the single query of a decode
step it spends ~3 ms per layer at 1.6k tokens of context (~13 MFLOP of work), and ~1.8 ms per layer on
a guard check's ~70 queries. Two small batched matmuls with the query heads grouped per key/value head
(no repeat of K/V) do the same in a fraction of that. Long prefills keep transformers' SDPA path.
"""

from __future__ import annotations

NAME = "llama_chat_grouped"
MAX_QUERIES = 128  # above this, SDPA's blocked kernel wins and bounds memory
SDPA_KEYS = 1024  # one query over up to this many keys: SDPA on the grouped heads is faster (see below)


def grouped_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query [B, H, q, D], key/value [B, KvH, n, D] -> ([B, q, H, D], None), as transformers expects.
    A None mask means plain causal attention over the queries (no cached positions) or a single query."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, dim = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    if q_len > MAX_QUERIES or b != 1 or (attention_mask is not None and attention_mask.dtype != torch.bool):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    q = query.reshape(b, kv_heads, group * q_len, dim)
    if attention_mask is not None:
        allowed = attention_mask[..., -q_len:, :n].reshape(b, 1, 1, q_len, n)
    elif q_len > 1:
        rows = torch.arange(q_len, device=query.device)[:, None] + (n - q_len)
        allowed = torch.arange(n, device=query.device)[None, :] <= rows
    else:
        allowed = None
    if q_len == 1 and n <= SDPA_KEYS:
        # One decode step, the query heads of each key/value head as SDPA's query rows: per layer (1B shape,
        # bf16, 2 threads) 23 vs 70 us at 64 keys, 80 vs 109 at 512, even at 1024, slower beyond.
        mask = None if allowed is None else allowed.reshape(b, 1, 1, n)
        out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale)
        return out.view(b, heads, q_len, dim).transpose(1, 2), None
    scores = (torch.matmul(q, key.transpose(-1, -2)).float() * scale).view(b, kv_heads, group, q_len, n)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(b, kv_heads, group * q_len, n)
    out = torch.matmul(probs, value).view(b, kv_heads, group, q_len, dim)
    return out.reshape(b, heads, q_len, dim).transpose(1, 2), None


def use_grouped_attention(model) -> bool:
    """Switch a transformers model that uses SDPA to `grouped_attention`; returns whether it did."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, grouped_attention)
        # SDPA's masks: materialised whenever queries follow cached positions, None only when plain causal
        # attention over the queries themselves (or a single query) is right.
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
