"""Write a transformers Llama model in Meta's original format (params.json, consolidated.00.pth)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def _unpermute(w, n_heads: int):
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def export_meta(model, tokenizer_model: Path, folder: Path, *, multiple_of: int = 16) -> Path:
    import torch

    cfg = model.config
    folder.mkdir(parents=True, exist_ok=True)
    dim = cfg.hidden_size
    base = int(2 * 4 * dim / 3)
    params = {
        "dim": dim, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size, "multiple_of": multiple_of,
        "ffn_dim_multiplier": cfg.intermediate_size / base, "norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_parameters["rope_theta"], "use_scaled_rope": True,
    }
    (folder / "params.json").write_text(json.dumps(params))
    sd = model.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    names = {"self_attn.o_proj": "attention.wo", "self_attn.v_proj": "attention.wv", "mlp.gate_proj": "feed_forward.w1",
             "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention.wq.weight"] = _unpermute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        out[f"layers.{i}.attention.wk.weight"] = _unpermute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        for a, b in names.items():
            out[f"layers.{i}.{b}.weight"] = sd[p + a + ".weight"]
    torch.save({k: v.clone() for k, v in out.items()}, folder / "consolidated.00.pth")
    shutil.copy(tokenizer_model, folder / "tokenizer.model")
    return folder
