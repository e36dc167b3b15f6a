"""`python -m guard`: screen the last of alternating user/assistant TEXTs with Llama Guard 3.

Exit status: 0 safe, 3 unsafe (blocked), 2 usage or load error.
"""

from __future__ import annotations

import argparse
import json
import sys

from guard.classifier import DEFAULT_GUARD
from model.errors import LlamaChatError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m guard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("texts", nargs="+", metavar="TEXT", help="user, assistant, user, ... turns; the last is judged")
    p.add_argument("--guard-model", default=DEFAULT_GUARD, help="HF repo id (local cache), folder or .gguf")
    p.add_argument("--exclude", default="", help="categories to leave out, e.g. S6,S7")
    p.add_argument("--threshold", type=float, default=0.5, help="P(unsafe) at which to block (default 0.5)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    args = p.parse_args(argv)

    from guard.categories import parse_codes
    from guard.classifier import Guard, GuardSettings

    try:
        settings = GuardSettings(threshold=args.threshold, excluded=parse_codes(args.exclude))
        guard = Guard.load(args.guard_model, device=args.device, dtype=args.dtype, settings=settings)
    except (LlamaChatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(args.texts)]
    verdict = guard.check(messages)
    if args.json:
        print(json.dumps(verdict.to_dict()))
    else:
        print(f"{'safe' if verdict.safe else 'unsafe'}\t{verdict.describe()}\tscore={verdict.score:.3f}\t"
              f"{verdict.latency_s * 1000:.0f} ms")
    return 0 if verdict.safe else 3


if __name__ == "__main__":
    sys.exit(main())
