"""`python -m bench.runner --quantize MODE [--quick]`: a CPU weight mode measured the way a user meets it.

A random-weight Llama-3.2-1B-shaped checkpoint (with the real tokenizer files) is written to a temporary
folder; `python -m model` then runs in fresh processes: first token cold (empty quantization cache: load
bf16, quantize, store) and warm (cache hit; the median of three), decode speed at short context and at
~1k tokens of context, and the peak RSS of the warm process. Then, in one more fresh process, decode
speed with compiled steps (model.compiled) once they are ready against eager steps on the same weights
(the runner itself compiles only where that pays: not over the native step, see model.step). Plain
transformers generate() in bf16 runs on the same checkpoint in this process.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import LLAMA_1B, QUICK, emit, env_note, memory_read_gb_s, threads, write_random_checkpoint

LONG_PROMPT = ("Summarise the following notes in one paragraph. " + "The river bends twice before it reaches the "
               "town, and fishermen leave at dawn when the water is still. " * 48)


def _run_model(folder: Path, home: Path, mode: str, prompt: str, new_tokens: int) -> dict:
    """One fresh `python -m model` process: seconds to its first output byte, its stats, its peak RSS."""
    env = {**os.environ, "LLAMA_CHAT_HOME": str(home)}
    cmd = [sys.executable, "-m", "model", "--model", str(folder), "--quantize", mode, "--temperature", "0",
           "--device", "cpu", "--threads", str(threads()), "--max-new-tokens", str(new_tokens), "--stats", prompt]
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


def compiled_decode(folder: Path, home: Path, mode: str, new_tokens: int) -> dict:
    """Decode speed with compiled steps once they are ready, as a chat in the app reaches it, against
    eager steps on the same weights in the same fresh process, alternating which runs first. The
    quantized weights come from the cache the earlier processes built; inductor's cache starts empty."""
    env = {**os.environ, "LLAMA_CHAT_HOME": str(home)}
    cmd = [sys.executable, "-m", "bench.quantized", str(folder), mode, str(new_tokens), str(threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"compiled decoding failed: {proc.stderr[-2000:]}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for line in lines[:-1]:
        emit(line)
    return lines[-1]


def _compiled_decode_here(folder: Path, mode: str, new_tokens: int) -> dict:
    from model.compiled import CompiledDecoder
    from model.loading import Loaded
    from model.runner import Runner
    from model.sampling import Sampling

    runner = Runner.load(str(folder), device="cpu", quantize=mode)
    # As compile_decoding() would, even where the runner declines (its eager step is native): the figures say why.
    runner.compiled = CompiledDecoder(runner.model, max_positions=runner.context_window)
    eager = Runner(Loaded(runner.model, runner.tokenizer, runner.source, tuple(runner.eos_ids), runner.defaults),
                   device="cpu")
    t0 = time.perf_counter()
    if not runner.compiled.wait(1):
        raise SystemExit(f"compiling failed: {runner.compiled.error}")
    out = {"compile_first_bucket_s": round(time.perf_counter() - t0, 2)}
    greedy = Sampling(temperature=0, max_new_tokens=new_tokens)
    for turn, (key, prompt) in enumerate((("short", "Tell me a story about the sea."), ("1k", LONG_PROMPT))):
        messages = [{"role": "user", "content": prompt}]
        n = len(runner.fit(messages, date=dt.date.today(), max_new_tokens=new_tokens)[0])
        if not (runner.compiled.wait(n) and runner.compiled.wait(n + new_tokens)):
            raise SystemExit(f"compiling failed: {runner.compiled.error}")
        while runner.compiled.busy:  # measure steady state, not decoding beside a compile
            time.sleep(0.1)
        for name, r in ((("compiled", runner), ("eager", eager))[:: 1 if turn % 2 else -1]):
            r.reset()
            "".join(r.stream(messages, sampling=greedy))
            emit({"phase": f"{name} {key} (same process)", **r.last_stats.to_dict()})
            out[f"{name}_{key}"] = round(r.last_stats.decode_tok_s, 2)
    return out


def main(args) -> int:
    from model.device import configure_threads, pick_dtype

    configure_threads("cpu", args.threads)
    dtype = pick_dtype("auto", "cpu")
    shape = QUICK if args.quick else LLAMA_1B
    new_tokens = args.new_tokens or (48 if args.quick else 128)
    work = Path(tempfile.mkdtemp(prefix="llama-chat-bench-"))
    try:
        folder, home = work / "model", work / "home"
        write_random_checkpoint(folder, shape, dtype=dtype)

        cold = _run_model(folder, home, args.quantize, "Hi", 1)
        emit({"phase": "cold", "first_token_s": round(cold["first_token_s"], 2)})
        # The cold run leaves the new cache entry as dirty pages, written back ~30 s later, in the middle of
        # the next measurements; a user's next start finds it on disk.
        os.sync()
        warm = sorted(_run_model(folder, home, args.quantize, "Hi", 1)["first_token_s"] for _ in range(3))
        emit({"phase": "warm", "first_token_s": [round(t, 2) for t in warm]})
        # Decoding streams every weight once per token, so its speed follows the VM's memory bandwidth,
        # which changes from minute to minute here: measured just before each decoding run.
        bandwidth = {"short": memory_read_gb_s()}
        short = _run_model(folder, home, args.quantize, "Tell me a story about the sea.", new_tokens)
        emit({"phase": "short", **short["stats"]})
        bandwidth["1k"] = memory_read_gb_s()
        long = _run_model(folder, home, args.quantize, LONG_PROMPT, new_tokens)
        emit({"phase": "1k", **long["stats"]})
        compiled = compiled_decode(folder, home, args.quantize, new_tokens)
        baseline = baseline_decode(folder, dtype, new_tokens)
        from model.quant import kernel

        emit({
            "quantize": args.quantize, "kernel": kernel(), "shape": "llama-3.2-1b" if not args.quick else "quick", **shape,
            "activations": str(dtype).replace("torch.", ""), "threads": threads(),
            "decode_tok_s": round(short["stats"]["decode_tok_s"], 2),
            "decode_tok_s_1k": round(long["stats"]["decode_tok_s"], 2), "context_1k_tokens": long["stats"]["prompt_tokens"],
            "memory_read_gb_s_before_decode": bandwidth,
            "first_token_cold_s": round(cold["first_token_s"], 2), "first_token_warm_s": round(warm[1], 2),
            "peak_rss_mb": round(short["peak_rss_mb"], 1),
            "compiled_decode_tok_s": compiled["compiled_short"], "compiled_decode_tok_s_1k": compiled["compiled_1k"],
            "same_process_eager_decode_tok_s": compiled["eager_short"],
            "same_process_eager_decode_tok_s_1k": compiled["eager_1k"],
            "compile_first_bucket_s": compiled["compile_first_bucket_s"],
            "baseline_bf16_generate_decode_tok_s": round(baseline, 2), **env_note(),
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":  # the fresh process compiled_decode() starts
    from model.device import configure_threads

    configure_threads("cpu", int(sys.argv[4]))
    emit(_compiled_decode_here(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
