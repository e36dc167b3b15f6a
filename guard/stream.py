"""Moderating a reply while it streams.

The moderator is fed the reply's text deltas. Every N tokens, and at a sentence end once N/2 tokens are
unchecked, it checks the reply so far (N follows the guard's speed when `guard_share` is given); the guard's per-role KV cache already holds the conversation and
the reply up to the last check, so each check computes only the new reply tokens plus the closing
instruction.

- strict: text is handed on only after a check has passed it; an unsafe check blocks the rest.
- fast: text is handed on at once; an unsafe check retracts everything handed on.
A final check on the complete reply always runs.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Sequence

from guard.verdict import Verdict

MODES = ("strict", "fast")
MAX_STRETCH = 4  # the longest interval a guard_share makes, in check_every intervals
_SENTENCE_END = re.compile(r"[.!?。！？…](\s|$)|\n")


@dataclass(frozen=True)
class Release:
    """Text that may be shown."""

    text: str


@dataclass(frozen=True)
class Retract:
    """Fast mode: everything released so far must be withdrawn."""

    verdict: Verdict


@dataclass(frozen=True)
class Block:
    """Strict mode: the reply failed a check; nothing unsafe was released."""

    verdict: Verdict


class StreamModerator:
    """Feed it deltas, show what it releases, stop the model when it blocks or retracts."""

    def __init__(self, guard, context: Sequence[dict], *, mode: str = "strict", check_every: int = 64,
                 min_sentence_tokens: int | None = None, guard_share: float | None = None):
        if mode not in MODES:
            raise ValueError(f"guard mode must be one of {', '.join(MODES)}, not {mode!r}")
        if check_every < 1:
            raise ValueError("check_every must be at least 1 token")
        self.guard, self.context, self.mode = guard, list(context), mode
        # Each check also recomputes the guard's ~57-token closing instruction after the reply: sentence-end
        # checks at least half the interval apart bound that cost (it was 65% of a reply's guard work when
        # short sentences each triggered one).
        self.check_every = check_every
        self.min_sentence_tokens = max(1, check_every // 2) if min_sentence_tokens is None else min_sentence_tokens
        # With `guard_share`, the interval follows the guard's speed: after each check it becomes the tokens
        # the model writes while the guard would spend `guard_share` of the time checking them (at least
        # check_every, at most MAX_STRETCH times it), so a slow guard is not paid a fixed closing
        # instruction every check_every tokens. Strict mode still shows nothing before a check passes it.
        self.guard_share = guard_share
        self.interval, self.sentence_tokens = check_every, self.min_sentence_tokens  # as they are now
        self._fed_s = 0.0  # time between feeds since the last check: the model writing
        self._last = None
        self.text = ""  # the reply so far
        self.released = 0  # characters of `text` handed on
        self.checked = 0  # characters of `text` a passed check has covered
        self.unchecked_tokens = 0
        self.verdicts: list[Verdict] = []
        self.failed: Verdict | None = None

    @property
    def stopped(self) -> bool:
        return self.failed is not None

    def feed(self, delta: str) -> list:
        if self.stopped or not delta:
            return []
        now = time.perf_counter()
        if self._last is not None:
            self._fed_s += now - self._last
        self._last = now
        self.text += delta
        self.unchecked_tokens += 1
        events = []
        if self.mode == "fast":
            events.append(self._release())
        due = self.unchecked_tokens >= self.interval or (
            self.unchecked_tokens >= self.sentence_tokens and _SENTENCE_END.search(delta)
        )
        if due:
            events += self._check()
        return events

    def finish(self) -> list:
        """The final check on the complete reply; in strict mode it releases what is still held."""
        if self.stopped:
            return []
        return self._check()

    def _release(self) -> Release:
        out = Release(self.text[self.released :])
        self.released = len(self.text)
        return out

    def _check(self) -> list:
        tokens, self.unchecked_tokens = self.unchecked_tokens, 0
        verdict = self.guard.check([*self.context, {"role": "assistant", "content": self.text}], stage="output")
        self.verdicts.append(verdict)
        if self.guard_share and tokens > 1 and self._fed_s > 0:
            tokens_per_s = tokens / self._fed_s
            interval = math.ceil(tokens_per_s * verdict.latency_s / self.guard_share)
            self.interval = min(max(interval, self.check_every), MAX_STRETCH * self.check_every)
            self.sentence_tokens = self.interval // 2
        self._fed_s, self._last = 0.0, time.perf_counter()
        if verdict.safe:
            self.checked = len(self.text)
            pending = self.text[self.released :]
            return [self._release()] if pending else []
        self.failed = verdict
        if self.mode == "fast" and self.released:
            return [Retract(verdict)]
        return [Block(verdict)]
