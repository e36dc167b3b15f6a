"""`python -m model`: chat with a checkpoint from the command line, one PROMPT per user turn."""

from __future__ import annotations

import argparse
import json
import sys

from model import DEFAULT_MODEL, QUANTIZE_MODES
from model.errors import LlamaChatError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="user turns of one conversation, in order")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF repo id (from the local cache), folder or .gguf")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy; default from the checkpoint")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="penalty on recently written tokens (llama.cpp's repeat_penalty); 1 is off")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per physical core)")
    p.add_argument("--context", type=int, default=None, help="context window in tokens (default 8192 on CPU)")
    p.add_argument("--quantize", default="auto", choices=QUANTIZE_MODES,
                   help="CPU weight mode: bf16 (none), int8, int4 (group 32; output layer int4, its best logits from int8), int4-fast (group 128); "
                        "auto (default): int4 on a CPU where it runs fast, else bf16 (README)")
    p.add_argument("--compile", action="store_true",
                   help="compile decode steps in the background; replies switch over once ready (see model.compiled)")
    p.add_argument("--stats", action="store_true", help="print one JSON line of stats per turn to stderr")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from model.runner import Runner
    from model.sampling import Sampling

    sampling = Sampling(args.temperature, args.top_p, args.top_k, args.seed, args.max_new_tokens,
                        args.repetition_penalty)
    try:
        sampling.validate()
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be at least 1, not {args.threads}")
        runner = Runner.load(args.model, device=args.device, dtype=args.dtype, threads=args.threads,
                             context_window=args.context, quantize=args.quantize, compile=args.compile,
                             progress=lambda text: print(text, file=sys.stderr, flush=True))
        messages = [{"role": "system", "content": args.system}] if args.system else []
        for prompt in args.prompts:
            messages.append({"role": "user", "content": prompt})
            reply = []
            for delta in runner.stream(messages, sampling=sampling):
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})
            if args.stats:
                from model.device import peak_rss_mb

                stats = {**runner.last_stats.to_dict(), "peak_rss_mb": round(peak_rss_mb(), 1)}
                print(json.dumps(stats), file=sys.stderr, flush=True)
    except (LlamaChatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    from model.compiled import exit_process

    exit_process(main())
