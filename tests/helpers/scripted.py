"""Scripted stand-ins for the chat model and the guard, for UI tests where the model's text does not
matter (layout, snapshots). They implement the same small interface the session uses."""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

from guard.verdict import Verdict
from model.runner import TurnStats

KEYWORD = "grenade"
REPLY = ("**Paris** is the capital of France.\n\nA quick way to check in Python:\n\n"
         "```python\nprint({'France': 'Paris'}['France'])\n```")


class ScriptedRunner:
    device = "cpu"
    context_window = 8192

    def __init__(self, reply: str = REPLY, delay: float = 0.0, name: str = "meta-llama/Llama-3.2-1B-Instruct",
                 rate: float | None = None):
        """`delay`: seconds after each token; `rate`: tokens per second on a fixed schedule (bench.tui)."""
        self.reply, self.delay, self.rate = reply, delay, rate
        self.source = SimpleNamespace(name=name)
        self.last_stats = None
        self.prompts: list[list[dict]] = []
        self.started_at = self.finished_at = 0.0

    def reset(self) -> None:
        pass

    def fit(self, messages, *, date, max_new_tokens):
        """Every prompt fits (as the runner's fit answers: ids and how many messages were dropped)."""
        return [0] * sum(len(m["content"].split()) for m in messages), 0

    def close(self) -> None:
        pass

    def stream(self, messages, *, sampling=None, date=None, cancel=None):
        self.prompts.append(list(messages))
        stats = TurnStats(prompt_tokens=40 + 10 * len(messages), cached_tokens=0, ttft_s=0.05, decode_tok_s=12.5,
                          prefill_tok_s=300.0)
        self.last_stats = stats
        self.started_at = time.perf_counter()
        for i, piece in enumerate(re.findall(r"\S+\s*|\s+", self.reply)):
            if cancel is not None and cancel.is_set():
                stats.stop_reason = "cancelled"
                return
            if self.rate:
                time.sleep(max(0.0, self.started_at + i / self.rate - time.perf_counter()))
            stats.new_tokens += 1
            yield piece
            if self.delay:
                time.sleep(self.delay)
        self.finished_at = time.perf_counter()
        stats.stop_reason = "eos"


class ScriptedGuard:
    """Unsafe (S1) exactly when the judged message mentions the keyword."""

    name = "meta-llama/Llama-Guard-3-1B"

    def check(self, messages, *, stage=None, cancel=None):
        unsafe = KEYWORD in messages[-1]["content"]
        stage = stage or ("input" if len(messages) % 2 else "output")
        if unsafe:
            return Verdict(False, ("S1",), ("Violent Crimes",), 0.97, stage, 0.042, self.name, raw="unsafe\nS1")
        return Verdict(True, (), (), 0.01, stage, 0.042, self.name, raw="safe")


def scripted_loader(runner=None, guard=None):
    from app.session import Engine

    def load(config, *, demo, progress):
        progress("loading scripted model…")
        g = (guard or ScriptedGuard()) if config.guard.enabled else None
        r = runner or ScriptedRunner()
        return Engine(r, g, r.source.name, demo)

    return load
