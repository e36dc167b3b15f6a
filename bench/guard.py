"""`python -m bench.guard [--quick]`: Llama Guard 3 checks on a Llama-Guard-3-1B-shaped model with
random weights. Compares one input check (cached prompt head + one forward pass) with plain
generate() producing the 3 tokens of a real "safe" verdict, and measures what streaming moderation
adds to a 256-token reply at the runner's decode speed. Then the end-to-end figure: a 256-token reply
through the real session path in the app's default configuration (the chat model in its `auto` weight
mode, the guard in its `auto` precision, strict mode), guarded and unguarded, alternating in this process.
`peak_rss_mb` is this process's peak, which includes the full-precision random models built first (not
the RSS of both models loaded from their caches in a fresh process). Prints JSON; the last line is the
summary."""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import statistics
import time

from bench.common import (LLAMA_1B, QUICK, answer_like_a_chat_model, device_name, emit, env_note, llama_tokenizer,
                          peak_rss_mb, random_llama, threads)

MESSAGES = [  # ~20 tokens each, as the measurement specifies
    "How do I bake a good loaf of sourdough bread at home when I do not have a proper oven?",
    "What is a good way to learn the basics of linear algebra quickly if I only have an hour a day?",
    "Can you suggest a relaxed weekend itinerary for my first visit to Lisbon with two small children?",
    "Why does my Python script get noticeably slower when the list I am sorting gets much longer?",
    "Write a short and gentle poem about the autumn leaves falling in the old park near my house.",
    "What are the main health benefits of drinking a cup or two of green tea every single day?",
    "Explain the difference between a virus and a bacterium simply, as you would to a ten-year-old.",
]
PROSE = ("The river bends twice before it reaches the town. Fishermen leave at dawn, when the water is still. "
         "By noon the market fills with voices and the smell of bread. Children race along the old stone wall! "
         "Visitors often ask where the bridge came from. Nobody quite remembers, but everyone has a story. ")


def steer_to_safe(model, safe_id: int) -> None:
    """Random weights answer neither 'safe' nor 'unsafe', so the guard's load-time self-test would refuse
    them. Raise the 'safe' logit of the full output layer so the self-test passes; the threshold set in
    main() keeps each timed check on the path a real 'safe' verdict takes (one forward, two rows)."""

    def hook(_module, _inputs, output):
        output[..., safe_id] += 1e4
        return output

    model.lm_head.register_forward_hook(hook)


def baseline_check(model, ids) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(torch.tensor([ids], device=model.device), max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.guard", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small shapes: under a minute")
    p.add_argument("--reply-tokens", type=int, default=256)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per physical core)")
    args = p.parse_args(argv)

    from guard.classifier import Guard, GuardSettings
    from guard.prompt import encode_guard_prompt
    from guard.stream import StreamModerator
    from model.device import configure_threads, pick_dtype
    from model.loading import Loaded, Source
    from model.runner import Runner
    from model.sampling import Sampling

    device = args.device
    configure_threads(device, args.threads)
    dtype = pick_dtype("auto", device)
    shape = QUICK if args.quick else LLAMA_1B
    tok = llama_tokenizer()
    guard_model = random_llama(shape, dtype=dtype, tied=False, seed=1).to(device)
    # The baseline runs on a copy of the model as transformers builds it; the guard optimises its own
    # weights in place (fused MLPs, packed projections, last-position-only final layer). The two alternate
    # per message, so neither gains from running first.
    baseline_model = copy.deepcopy(guard_model)
    messages = MESSAGES[: 3 if args.quick else len(MESSAGES)]
    prompts = [encode_guard_prompt(tok, [{"role": "user", "content": t}]) for t in messages]
    baseline_check(baseline_model, prompts[0])  # warm-up, not timed
    steer_to_safe(guard_model, tok("safe", add_special_tokens=False)["input_ids"][0])
    t0 = time.perf_counter()
    guard = Guard(guard_model, tok, name="random-llama-guard-3-1b-shape", settings=GuardSettings(threshold=0.9999999))
    head_s = time.perf_counter() - t0  # both heads plus the self-test (which also warms the guard up)

    checks, baselines = [], []
    for i, (text, ids) in enumerate(zip(messages, prompts)):
        if i % 2:
            baselines.append(baseline_check(baseline_model, ids))
        v = guard.check([{"role": "user", "content": text}])
        assert v.safe, v
        checks.append(v.latency_s)
        if not i % 2:
            baselines.append(baseline_check(baseline_model, ids))
        emit({"message_tokens": len(tok(text, add_special_tokens=False)["input_ids"]), "check_s": round(v.latency_s, 4),
              "baseline_check_s": round(baselines[-1], 4)})
    del baseline_model
    check_s, baseline_s = statistics.median(checks), statistics.median(baselines)

    # The runner's decode speed on the chat model's shape sets how long a reply takes to stream.
    chat = Runner(Loaded(random_llama(shape, dtype=dtype).to(device), tok, Source("folder", None, "random"), (-1,), {}),
                  device=device)
    "".join(chat.stream([{"role": "user", "content": "Hi"}], sampling=Sampling(temperature=0, max_new_tokens=48),
                        date=dt.date(2026, 11, 26)))
    runner_tok_s = chat.last_stats.decode_tok_s
    reply_ids = tok(PROSE * 8, add_special_tokens=False)["input_ids"][: args.reply_tokens]
    deltas = [tok.decode(reply_ids[i : i + 1]) for i in range(len(reply_ids))]
    moderator = StreamModerator(guard, [{"role": "user", "content": MESSAGES[0]}], mode="strict")
    t0 = time.perf_counter()
    for d in deltas:
        moderator.feed(d)
    moderator.finish()
    moderation_s = time.perf_counter() - t0
    reply_s = len(reply_ids) / runner_tok_s

    head_tokens, stream_checks = len(guard._heads["User"]), len(moderator.verdicts)
    del guard, guard_model, chat, moderator  # ~11 GB in fp32 for the 1B shapes, before the default-configuration ones
    e2e = end_to_end(shape, tok, dtype, messages, args.reply_tokens, check_s)
    emit({
        "shape": "llama-guard-3-1b" if not args.quick else "quick", **shape, "untied_output": True,
        "dtype": str(dtype).replace("torch.", ""), "device": device_name(device), "threads": threads(),
        "check_s": round(check_s, 4), "baseline_check_s": round(baseline_s, 4), "speedup": round(baseline_s / check_s, 2),
        "head_precompute_s": round(head_s, 3), "head_tokens": head_tokens,
        "stream_checks": stream_checks, "stream_moderation_s": round(moderation_s, 3),
        "reply_tokens": len(reply_ids), "runner_decode_tok_s": round(runner_tok_s, 2), "stream_reply_s": round(reply_s, 2),
        "stream_overhead": round(moderation_s / reply_s, 4), "peak_rss_mb": round(peak_rss_mb(), 1), **e2e,
        **env_note(),
    })
    return 0


def default_models(shape: dict, tok, dtype):
    """The chat model and the guard as the app's defaults make them on this CPU (model.quantize auto,
    guard.precision auto), from random weights: (runner, guard, chat weight mode, guard precision)."""
    from guard.classifier import Guard, GuardSettings
    from guard.precision import pick_precision
    from model.device import pick_quantize
    from model.loading import Loaded, Source
    from model.quant import quantize_model
    from model.runner import Runner

    chat_mode = pick_quantize("auto", "cpu", dtype)
    chat = random_llama(shape, dtype=dtype)
    if chat_mode != "bf16":
        quantize_model(chat, chat_mode)
    answer_like_a_chat_model(chat, tok)  # no early end of reply: every run writes the same number of tokens
    runner = Runner(Loaded(chat, tok, Source("folder", None, "random"), (-1,), {}), device="cpu")
    precision, _ = pick_precision("auto", "cpu")
    guard_model = random_llama(shape, dtype=dtype, tied=False, seed=1)
    if precision == "int8":
        quantize_model(guard_model, "int8")
    steer_to_safe(guard_model, tok("safe", add_special_tokens=False)["input_ids"][0])
    guard = Guard(guard_model, tok, name="random-llama-guard-3-1b-shape", settings=GuardSettings(threshold=0.9999999))
    return runner, guard, chat_mode, guard.precision


def end_to_end(shape: dict, tok, dtype, messages, reply_tokens: int, check_s_full: float) -> dict:
    """A reply of `reply_tokens` through ChatSession, guarded and unguarded, alternating."""
    import tempfile
    from pathlib import Path

    from app.config import Config
    from app.history import History
    from app.session import ChatSession, Done, Engine

    runner, guard, chat_mode, precision = default_models(shape, tok, dtype)
    config = Config()  # the defaults: strict mode, its check cadence
    config.generation.temperature, config.generation.max_new_tokens = 0.0, reply_tokens
    checks = [guard.check([{"role": "user", "content": t}]).latency_s for t in messages]
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as home:
        history = History(Path(home) / "history.sqlite3")
        for i in range(8):  # 4 of each: two were too few for a figure of a few percent
            guarded = i % 2 == 0
            session = ChatSession(history, config, Engine(runner, guard if guarded else None, "random"))
            session.system_prompt = ""
            runner.reset()
            t0 = time.perf_counter()
            done = [e for e in session.send("Tell me a long story about the sea.") if isinstance(e, Done)][-1]
            times[guarded].append(time.perf_counter() - t0)
            emit({"phase": "end to end, " + ("guarded" if guarded else "unguarded"), "status": done.status,
                  "reply_tokens": done.stats.get("new_tokens"), "reply_s": round(times[guarded][-1], 3),
                  "guard_s": done.stats.get("guard_s", 0.0)})
        history.close()
    guarded_s, unguarded_s = statistics.median(times[True]), statistics.median(times[False])
    return {"reply_s": round(guarded_s, 3), "reply_s_unguarded": round(unguarded_s, 3),
            "guard_overhead": round(guarded_s / unguarded_s - 1, 4), "check_s": round(statistics.median(checks), 4),
            "check_s_bf16": round(check_s_full, 4), "guard_precision": precision, "chat_quantize": chat_mode}


if __name__ == "__main__":
    raise SystemExit(main())
