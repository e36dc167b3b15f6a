"""Scripted chat model and guard, for UI and session tests where the model's text does not matter (layout,
snapshots, flows). They implement the seams (model.backend.ChatBackend, guard.moderator.Moderator) over the
real Llama 3.2 tokenizer: prompts, detokenizing, stop and cancel handling, budgets and the fail-closed
check are the real code; only the ids generated and the verdict's score are scripted."""

from __future__ import annotations

import functools
import re
import time

from guard.moderator import Moderator
from model.backend import ChatBackend, TurnStats

KEYWORD = "grenade"
REPLY = ("**Paris** is the capital of France.\n\nA quick way to check in Python:\n\n"
         "```python\nprint({'France': 'Paris'}['France'])\n```")
FIXED_STATS = {"ttft_s": 0.05, "decode_tok_s": 12.5, "prefill_tok_s": 300.0}  # the same in every snapshot


@functools.cache
def tokenizer():
    from transformers import AutoTokenizer

    from tests.conftest import llama_tokenizer_path

    return AutoTokenizer.from_pretrained(llama_tokenizer_path())


class ScriptedRunner(ChatBackend):
    """Writes `reply` (one word and its space per step), whatever it is asked."""

    def __init__(self, reply: str = REPLY, delay: float = 0.0, name: str = "meta-llama/Llama-3.2-1B-Instruct",
                 rate: float | None = None):
        """`delay`: seconds after each token; `rate`: tokens per second on a fixed schedule (bench.tui)."""
        super().__init__()
        self.tokenizer = tokenizer()
        self.eos_ids = frozenset({self.tokenizer.convert_tokens_to_ids("<|eot_id|>")})
        self.reply, self.delay, self.rate, self.name = reply, delay, rate, name
        self.prompts: list[list[dict]] = []
        self.started_at = self.finished_at = 0.0

    def stream(self, messages, **kw):
        self.prompts.append(list(messages))
        yield from super().stream(messages, **kw)
        self.last_stats.__dict__.update(FIXED_STATS)

    def _generate(self, ids, sampling, stats: TurnStats, cancel):
        self.started_at = time.perf_counter()
        for i, piece in enumerate(re.findall(r"\S+\s*|\s+", self.reply)):
            if self.rate:
                time.sleep(max(0.0, self.started_at + i / self.rate - time.perf_counter()))
            stats.__dict__.update(FIXED_STATS)
            # a word as one id where the vocabulary has it; the reply text comes out the same either way
            yield from self.tokenizer(piece, add_special_tokens=False)["input_ids"]
            if self.delay:
                time.sleep(self.delay)
        self.finished_at = time.perf_counter()
        yield from self.eos_ids


class ScriptedGuard(Moderator):
    """Unsafe (S1, P(unsafe) 0.97) exactly when the judged message mentions the keyword."""

    def __init__(self, name: str = "meta-llama/Llama-Guard-3-1B"):
        super().__init__(tokenizer(), name=name)

    def _judge(self, role, ids, cancel=None):
        prompt = self.tokenizer.decode(ids)
        judged = prompt[: prompt.rindex("<END CONVERSATION>")].rsplit(f"\n\n{role}: ", 1)[-1]
        return (0.97, "unsafe\nS1") if KEYWORD in judged else (0.01, "safe")

    def check(self, messages, *, stage=None, cancel=None):
        verdict = super().check(messages, stage=stage, cancel=cancel)
        return type(verdict)(**{**verdict.__dict__, "latency_s": 0.042})  # the same in every snapshot


def scripted_loader(runner=None, guard=None):
    from app.session import Engine

    def load(config, *, demo, progress):
        progress("loading scripted model…")
        g = (guard or ScriptedGuard()) if config.guard.enabled else None
        r = runner or ScriptedRunner()
        return Engine(r, g, r.name, demo)

    return load
