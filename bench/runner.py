"""`python -m bench.runner [--quick]`: the runner against plain transformers generate() on the same
model, over one multi-turn conversation. Prints a JSON line per turn, then one summary object."""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import time

from bench.common import (LLAMA_1B, QUICK, answer_like_a_chat_model, device_name, emit, env_note, llama_tokenizer,
                          peak_rss_mb, random_llama, threads)

QUESTIONS = [
    "Explain how a KV cache speeds up autoregressive decoding.",
    "Now compare that with recomputing attention from scratch.",
    "What happens when the context window fills up?",
    "Give a short example in Python.",
    "How would you test that the cache gives identical output?",
    "Summarise the trade-offs in three bullet points.",
    "What about memory use on a laptop?",
    "Thanks! One last tip?",
]


class _FirstTokenClock:
    """A generate() streamer that records when the first new token arrives."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def baseline_turn(model, ids, new_tokens):
    """Plain generate() on the model as transformers builds it (its SDPA attention, plain weights)."""
    import torch

    clock = _FirstTokenClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, streamer=clock, pad_token_id=0)
    t1 = time.perf_counter()
    n = out.shape[1] - len(ids)
    return clock.first - t0, (n - 1) / (t1 - clock.first)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.runner", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small shape, 4 turns: under a minute")
    p.add_argument("--turns", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--quantize", choices=("int8", "int4", "int4-fast"), default=None,
                   help="measure a CPU weight mode from fresh processes instead (see bench/quantized.py)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ... (bf16 runs only)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per physical core)")
    args = p.parse_args(argv)
    if args.quantize and args.device != "cpu":
        p.error("--quantize is a CPU weight mode: leave --device out")
    if args.quantize:
        from bench.quantized import main as quantized_main

        return quantized_main(args)

    import torch

    from model.device import configure_threads, pick_dtype
    from model.loading import Loaded, Source
    from model.runner import Runner
    from model.sampling import Sampling

    shape = QUICK if args.quick else LLAMA_1B
    turns = args.turns or (4 if args.quick else 8)
    new_tokens = args.new_tokens or (48 if args.quick else 200)
    device = args.device
    configure_threads(device, args.threads)
    dtype = pick_dtype("auto", device)
    tok = llama_tokenizer()
    model = random_llama(shape, dtype=dtype).to(device)
    masked = answer_like_a_chat_model(model, tok)
    baseline_model = copy.deepcopy(model)  # as transformers builds it: the runner packs its own weights
    # Random weights rarely emit an end token; no eos makes every reply exactly `new_tokens` long.
    runner = Runner(Loaded(model, tok, Source("folder", None, "random"), (-1,), {}), device=device)
    sampling = Sampling(temperature=0, max_new_tokens=new_tokens)
    date = dt.date(2026, 11, 26)

    messages = [{"role": "system", "content": "You are a concise technical assistant."}]
    rows = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        ids = runner.fit(messages, date=date, max_new_tokens=new_tokens)[0]
        if turn % 2:  # alternate which runs first, so neither gains from the order
            b_ttft, b_decode = baseline_turn(baseline_model, ids, new_tokens)
        reply = "".join(runner.stream(messages, sampling=sampling, date=date))
        s = runner.last_stats
        if not turn % 2:
            b_ttft, b_decode = baseline_turn(baseline_model, ids, new_tokens)
        row = {"turn": turn + 1, "prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens,
               "ttft_s": round(s.ttft_s, 4), "baseline_ttft_s": round(b_ttft, 4),
               "decode_tok_s": round(s.decode_tok_s, 2), "baseline_decode_tok_s": round(b_decode, 2)}
        emit(row)
        rows.append(row)
        messages.append({"role": "assistant", "content": reply})

    # Prefill speed on a fresh ~1k-token prompt, both ways. Each runs once untimed first: a GPU's first use
    # of a shape loads and picks kernels (seconds), which would bill whichever runs first.
    long = [{"role": "user", "content": " ".join(QUESTIONS) * 10}]
    ids = runner.fit(long, date=date, max_new_tokens=1)[0]
    for _ in range(2):
        runner.reset()
        "".join(runner.stream(long, sampling=Sampling(temperature=0, max_new_tokens=1), date=date))
        prefill = runner.last_stats
        t0 = time.perf_counter()
        with torch.inference_mode():
            baseline_model(torch.tensor([ids], device=device), logits_to_keep=1).logits[0, -1, 0].item()  # waits for a GPU
        baseline_prefill = len(ids) / (time.perf_counter() - t0)

    def mean(key):
        return round(sum(r[key] for r in rows) / len(rows), 2)

    ttft = [r["ttft_s"] for r in rows]
    emit({
        "shape": "llama-3.2-1b" if not args.quick else "quick", **shape, "dtype": str(dtype).replace("torch.", ""),
        "device": device_name(device), "threads": threads(), "turns": turns, "new_tokens_per_turn": new_tokens,
        "decode_tok_s": mean("decode_tok_s"), "baseline_decode_tok_s": mean("baseline_decode_tok_s"),
        "prefill_tok_s": round(prefill.prefill_tok_s, 1), "baseline_prefill_tok_s": round(baseline_prefill, 1),
        "prefill_tokens": prefill.prompt_tokens, "masked_vocab_ids": masked,
        "ttft_s": ttft, "baseline_ttft_s": [r["baseline_ttft_s"] for r in rows],
        "ttft_last_over_first": round(ttft[-1] / ttft[0], 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), **env_note(),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
