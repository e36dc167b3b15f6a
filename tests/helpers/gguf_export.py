"""Write a transformers Llama model and its tokenizer as a llama.cpp-style GGUF file (F32 tensors),
so the GGUF loading path can be tested without downloading one."""

from __future__ import annotations

import json
from pathlib import Path


def _llamacpp_permute(w, n_heads: int):
    """llama.cpp's convert script interleaves rotary pairs of q/k; transformers undoes it on load."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_gguf(model, tokenizer_json: Path, path: Path) -> Path:
    import gguf
    import numpy as np
    import torch

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tj = json.loads(Path(tokenizer_json).read_text())
    vocab = tj["model"]["vocab"]
    added = {t["id"]: t["content"] for t in tj["added_tokens"]}
    n = max(max(vocab.values()), max(added)) + 1
    tokens, types = [""] * n, [gguf.TokenType.NORMAL] * n
    for tok, i in vocab.items():
        tokens[i] = tok
    for i, tok in added.items():
        tokens[i], types[i] = tok, gguf.TokenType.CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(128000)
    w.add_eos_token_id(128009)

    rot = model.model.rotary_emb
    base = 1.0 / (rot.config.rope_parameters["rope_theta"] ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    w.add_tensor("rope_freqs.weight", (base / rot.inv_freq.float()).numpy().astype(np.float32))

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    for i in range(cfg.num_hidden_layers):
        for a, b in per_layer.items():
            names[f"model.layers.{i}.{a}.weight"] = f"blk.{i}.{b}.weight"
    sd = model.state_dict()
    for hf_name, gg_name in names.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = sd[hf_name].float().numpy()
        if hf_name.endswith("q_proj.weight"):
            t = _llamacpp_permute(t, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = _llamacpp_permute(t, cfg.num_key_value_heads)
        w.add_tensor(gg_name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
