"""Meta's original Llama 3 checkpoint format (params.json, consolidated.00.pth, tokenizer.model),
converted on load into a transformers Llama model and a fast tokenizer."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from model.errors import ModelError

LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]
LLAMA3_EOS = [128001, 128008, 128009]


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def config_from_params(params: dict, vocab_size: int):
    from transformers import LlamaConfig

    dim, n_heads = params["dim"], params["n_heads"]
    rope_scaling = None
    if params.get("use_scaled_rope"):
        rope_scaling = {
            "rope_type": "llama3",
            "factor": float(params.get("rope_scaling_factor", 32.0)),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    return LlamaConfig(
        vocab_size=params.get("vocab_size", vocab_size),
        hidden_size=dim,
        intermediate_size=ffn_hidden_size(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=params.get("n_kv_heads", n_heads),
        rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 500000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=131072 if rope_scaling else 8192,
        bos_token_id=128000,
        eos_token_id=LLAMA3_EOS,
        tie_word_embeddings=False,
    )


def _permute(w, n_heads: int):
    """Meta stores q/k rotary pairs interleaved; transformers expects the two halves split."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def convert_state_dict(sd: dict, config) -> dict:
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd.get("output.weight", sd["tok_embeddings.weight"]),
    }
    names = {
        "attention.wo": "self_attn.o_proj",
        "attention.wv": "self_attn.v_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w2": "mlp.down_proj",
        "feed_forward.w3": "mlp.up_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "self_attn.q_proj.weight"] = _permute(sd[src + "attention.wq.weight"], n_heads)
        out[dst + "self_attn.k_proj.weight"] = _permute(sd[src + "attention.wk.weight"], n_kv)
        for a, b in names.items():
            out[dst + b + ".weight"] = sd[src + a + ".weight"]
    return out


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def tokenizer_from_tiktoken(path: Path):
    """A fast tokenizer equal to the HF Llama 3 tokenizer, built from Meta's tokenizer.model."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(url):  # no tiktoken dependency: the format is base64 token + rank
            return load_tiktoken_ranks(Path(url))

    backend = _Converter(str(path), extra_special_tokens=LLAMA3_SPECIAL_TOKENS).converted()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        clean_up_tokenization_spaces=False,
    )


def load_meta_model(folder: Path, *, dtype):
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    files = sorted(folder.glob("consolidated.*.pth"))
    missing = [n for n in ("params.json", "tokenizer.model") if not (folder / n).is_file()]
    if missing or not files:
        raise ModelError(f"{folder} is missing {', '.join(missing) or 'consolidated.00.pth'} (Meta original format).")
    if len(files) > 1:
        raise ModelError(f"{folder} is sharded ({len(files)} files); only single-file checkpoints (1B, 3B) load.")
    params = json.loads((folder / "params.json").read_text())
    config = config_from_params(params, vocab_size=128256)
    sd = torch.load(files[0], map_location="cpu", mmap=True, weights_only=True)
    config.tie_word_embeddings = "output.weight" not in sd
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.to(dtype) for k, v in convert_state_dict(sd, config).items()}, assign=True, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # buffers were on the meta device
    model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=128000, eos_token_id=LLAMA3_EOS, do_sample=True, temperature=0.6, top_p=0.9
    )
    return model
