"""`python -m bench.runner --quantize MODE [--quick]`: a CPU weight mode measured the way a user meets it.

A random-weight Llama-3.2-1B-shaped checkpoint is written to a temporary folder; `python -m model` then
runs in fresh processes: first token cold (empty quantization cache: load bf16, quantize, store) and
warm (cache hit), decode speed at short context and at ~1k tokens of context, and the peak RSS of the
warm process. Plain transformers generate() in bf16 runs on the same checkpoint in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import LLAMA_1B, QUICK, emit, env_note, llama_tokenizer, random_llama, threads

LONG_PROMPT = ("Summarise the following notes in one paragraph. " + "The river bends twice before it reaches the "
               "town, and fishermen leave at dawn when the water is still. " * 48)


def _run_model(folder: Path, home: Path, mode: str, prompt: str, new_tokens: int) -> dict:
    """One fresh `python -m model` process: seconds to its first output byte, its stats, its peak RSS."""
    env = {**os.environ, "LLAMA_CHAT_HOME": str(home)}
    cmd = [sys.executable, "-m", "model", "--model", str(folder), "--quantize", mode, "--temperature", "0",
           "--max-new-tokens", str(new_tokens), "--stats", prompt]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    out = first + proc.stdout.read()
    err = proc.stderr.read().decode()
    status = proc.wait()
    if status != 0 or not out:
        raise SystemExit(f"python -m model failed ({status}): {err[-2000:]}")
    stats = json.loads([line for line in err.splitlines() if line.startswith("{")][-1])
    return {"first_token_s": t_first, "stats": stats, "peak_rss_mb": stats["peak_rss_mb"]}


def baseline_decode(folder: Path, dtype, new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = torch.tensor([[128000, 9906, 11, 1268, 527, 499, 30]])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)


def main(args) -> int:
    from model.device import configure_threads, pick_dtype

    configure_threads("cpu")
    dtype = pick_dtype("auto", "cpu")
    shape = QUICK if args.quick else LLAMA_1B
    new_tokens = args.new_tokens or (48 if args.quick else 128)
    work = Path(tempfile.mkdtemp(prefix="llama-chat-bench-"))
    try:
        folder, home = work / "model", work / "home"
        model = random_llama(shape, dtype=dtype)
        model.generation_config.eos_token_id = [128001, 128008, 128009]
        model.save_pretrained(folder)
        del model
        llama_tokenizer().save_pretrained(folder)

        cold = _run_model(folder, home, args.quantize, "Hi", 1)
        emit({"phase": "cold", "first_token_s": round(cold["first_token_s"], 2)})
        warm = _run_model(folder, home, args.quantize, "Hi", 1)
        short = _run_model(folder, home, args.quantize, "Tell me a story about the sea.", new_tokens)
        emit({"phase": "short", **short["stats"]})
        long = _run_model(folder, home, args.quantize, LONG_PROMPT, new_tokens)
        emit({"phase": "1k", **long["stats"]})
        baseline = baseline_decode(folder, dtype, new_tokens)
        emit({
            "quantize": args.quantize, "shape": "llama-3.2-1b" if not args.quick else "quick", **shape,
            "activations": str(dtype).replace("torch.", ""), "threads": threads(),
            "decode_tok_s": round(short["stats"]["decode_tok_s"], 2),
            "decode_tok_s_1k": round(long["stats"]["decode_tok_s"], 2), "context_1k_tokens": long["stats"]["prompt_tokens"],
            "first_token_cold_s": round(cold["first_token_s"], 2), "first_token_warm_s": round(warm["first_token_s"], 2),
            "peak_rss_mb": round(short["peak_rss_mb"], 1),
            "baseline_bf16_generate_decode_tok_s": round(baseline, 2), **env_note(),
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
