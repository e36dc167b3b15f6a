"""`python -m bench.remote --guard-url URL --guard-tokenizer PATH`: what vLLM's prefix caching saves on the
guard checks of a streaming reply. The checks a stream moderator makes (guard.stream) are sent to a Llama
Guard 3 server as the remote guard sends them: the same conversation with the reply grown by `--every`
tokens each time. Each step is sent twice, alternating which goes first: once as is (the server can reuse
the prompt it saw last time) and once with a fresh `cache_salt` (vLLM then computes the whole prompt).
Start the server with --enable-prompt-tokens-details to see the cached prompt tokens it reports.
Prints JSON: median check latency and cached prompt tokens for each, and their ratio."""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

from bench.common import emit, env_note

WORDS = ("the river bends twice before it reaches the town where fishermen leave at dawn and the market fills "
         "with voices and the smell of bread while children race along the old stone wall").split()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--guard-url", required=True, help="the guard server, like http://127.0.0.1:8001/v1")
    p.add_argument("--guard-tokenizer", required=True, help="the guard's tokenizer: repo id or folder")
    p.add_argument("--served-model", default="")
    p.add_argument("--checks", type=int, default=24)
    p.add_argument("--every", type=int, default=64, help="reply words between checks")
    args = p.parse_args(argv)

    from guard.remote import RemoteGuard

    guard = RemoteGuard.connect(args.guard_url, tokenizer=args.guard_tokenizer, served_model=args.served_model)
    question = {"role": "user", "content": "Tell me a long story about a river town, please."}
    runs = {"prefix cached": [], "uncached": []}
    cached = {"prefix cached": [], "uncached": []}
    for step in range(1, args.checks + 1):
        reply = " ".join(WORDS[i % len(WORDS)] for i in range(step * args.every))
        ids = guard.prompt_ids([question, {"role": "assistant", "content": reply}])
        order = list(runs) if step % 2 else list(runs)[::-1]
        for mode in order:
            extra = {"cache_salt": uuid.uuid4().hex} if mode == "uncached" else {}
            t = time.perf_counter()
            usage = guard.request(ids, 1, **extra).get("usage") or {}
            runs[mode].append(time.perf_counter() - t)
            cached[mode].append((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        last_prompt = len(ids)
    med = {mode: statistics.median(times) for mode, times in runs.items()}
    emit({"bench": "remote_guard_prefix_cache", "server": args.guard_url, "model": guard.served_model,
          "checks": args.checks, "reply_words_per_check": args.every, "last_prompt_tokens": last_prompt,
          "median_check_ms": {m: round(v * 1000, 2) for m, v in med.items()},
          "median_cached_prompt_tokens": {m: statistics.median(c) for m, c in cached.items()},
          "uncached_over_cached": round(med["uncached"] / med["prefix cached"], 2), **env_note()})


if __name__ == "__main__":
    main()
