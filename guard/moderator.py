"""The `Moderator` seam: what the session needs from a guard, whoever computes the verdicts.

A moderator screens the last message of a user/assistant conversation with Llama Guard 3's prompt, built
here as token ids (message text never becomes a control token) and judged by a subclass: `guard.classifier.
Guard` runs the model in this process, `guard.remote.RemoteGuard` asks a vLLM server. Whatever goes wrong
while screening comes back as a blocking verdict: the guard fails closed.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

from guard.categories import LLAMA_GUARD_3_CATEGORIES
from guard.prompt import check_conversation, conversation_text, head_parts, judged_role, tail_parts
from guard.verdict import Verdict, parse_verdict
from model.errors import LlamaChatError
from model.prompt import encode_parts, is_llama3_tokenizer

MAX_CATEGORY_TOKENS = 12  # the category line after 'unsafe' ("S1,S10" and the end of turn fit easily)
SELF_TEST = [{"role": "user", "content": "Hello! Can you recommend a good book about the history of tea?"}]


class GuardError(LlamaChatError):
    title = "Guard error"


class CheckCancelled(LlamaChatError):
    """A check stopped at the caller's request: it gave no verdict, so what it was checking did not pass."""

    title = "Check cancelled"


@dataclass
class GuardSettings:
    """What the guard screens for and how."""

    threshold: float = 0.5  # P(unsafe) at or above which a message is blocked
    excluded: tuple[str, ...] = ()  # categories left out of the prompt (numbering unchanged)
    categories: dict[str, str] | None = None  # a full custom list replaces Llama Guard's own
    token_budget: int = 2048  # conversation tokens the guard sees; older turns fall out first
    window_overlap: int = 128  # overlap between windows of a message longer than the budget
    policy: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1, not {self.threshold}")
        if self.token_budget < 64 or not 0 <= self.window_overlap < self.token_budget // 2:
            raise ValueError("token_budget must be at least 64 and window_overlap under half of it")
        self.policy = dict(self.categories if self.categories is not None else LLAMA_GUARD_3_CATEGORIES)
        unknown = [c for c in self.excluded if c not in self.policy]
        if unknown:
            raise ValueError(f"unknown categories to exclude: {', '.join(unknown)} (known: {', '.join(self.policy)})")


def not_a_guard(name: str, top: str, mass: float) -> GuardError:
    """The self-test's refusal: the model's verdict token is neither 'safe' nor 'unsafe'."""
    return GuardError(
        f"{name} does not answer like Llama Guard 3: its verdict token was {top!r}, not 'safe' or 'unsafe' (they "
        f"got {mass:.0%} of the probability). Point the guard at Llama-Guard-3-1B.",
        title="Not a guard model",
    )


class Moderator(ABC):
    """Llama Guard 3 screening over a tokenizer; subclasses say how a prompt's verdict is computed."""

    engine = "local"  # where verdicts are computed: local, or the server's address
    precision = ""  # how: int8, bf16, fp32 (guard.precision), or the server's engine
    precision_note = ""  # why the precision asked for is not the one in use

    def __init__(self, tokenizer, *, name: str, settings: GuardSettings | None = None):
        if not is_llama3_tokenizer(tokenizer):
            raise GuardError(f"{name} does not have the Llama 3 tokenizer Llama Guard 3 needs.")
        self.tokenizer, self.name = tokenizer, name
        self.settings = s = settings or GuardSettings()
        self._nn = self._single_token("\n\n")  # what the guard writes first, before its verdict
        self._safe, self._unsafe = self._single_token("safe"), self._single_token("unsafe")
        self._eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
        self._lock = threading.RLock()
        self._heads = {r: encode_parts(tokenizer, head_parts(r, s.categories, s.excluded)) for r in ("User", "Agent")}
        self._tails = {r: encode_parts(tokenizer, tail_parts(r)) for r in ("User", "Agent")}

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise GuardError(f"{self.name}: {text!r} is not one token in its tokenizer; is this Llama Guard 3?")
        return ids[0]

    def prompt_ids(self, messages: Sequence[dict], conversation_ids: list[int] | None = None) -> list[int]:
        """The guard prompt for `messages` up to the verdict token: the model's next token is its verdict."""
        role = judged_role(messages)
        if conversation_ids is None:
            conversation_ids = self._encode_conversation(messages)
        return self._heads[role] + conversation_ids + self._tails[role] + [self._nn]

    @abstractmethod
    def _judge(self, role: str, ids: list[int], cancel=None) -> tuple[float, str]:
        """P(unsafe) of the verdict token after `ids` (between 'safe' and 'unsafe'), and, when it reaches the
        threshold, the verdict text from 'unsafe' on (its category line). Raises on any failure;
        `model.kvcache.Cancelled` when `cancel` is set."""

    # -- scoring ---------------------------------------------------------------------------------
    def _encode_conversation(self, messages: Sequence[dict]) -> list[int]:
        return self.tokenizer(conversation_text(messages), add_special_tokens=False,
                              split_special_tokens=True)["input_ids"]

    def _classify(self, messages: Sequence[dict], conversation_ids: list[int] | None = None, cancel=None) -> Verdict:
        """One check of a conversation that fits the budget. Raises on internal errors."""
        score, raw = self._judge(judged_role(messages), self.prompt_ids(messages, conversation_ids), cancel)
        if score < self.settings.threshold:
            return Verdict(True, score=score, raw="safe")
        allowed = [c for c in self.settings.policy if c not in self.settings.excluded]
        v = parse_verdict(raw, allowed, self.settings.excluded, self.settings.policy)
        return Verdict(v.safe, v.categories, v.category_names, score, reason=v.reason, raw=raw)

    # -- the public checks -----------------------------------------------------------------------
    def check(self, messages: Sequence[dict], *, stage: str | None = None, cancel=None) -> Verdict:
        """Screen the last message of an alternating user/assistant conversation. Never raises for a
        screening failure: errors come back as blocking verdicts. `cancel` (a threading.Event) set while
        it runs raises CheckCancelled: no verdict, and so nothing passed."""
        from model.kvcache import Cancelled

        t0 = time.perf_counter()
        stage = stage or ("input" if len(messages) % 2 == 1 else "output")
        try:
            check_conversation(messages)
            with self._lock:
                verdict = self._check_within_budget(list(messages), cancel)
        except Cancelled:
            raise CheckCancelled(f"The {stage} check was cancelled before it finished.") from None
        except LlamaChatError as e:  # fail closed: a guard that cannot answer blocks
            verdict = Verdict(False, reason=f"guard error: {e.message}")
        except Exception as e:
            verdict = Verdict(False, reason=f"guard error: {type(e).__name__}: {e}")
        return Verdict(**{**verdict.__dict__, "stage": stage, "latency_s": time.perf_counter() - t0,
                          "guard_model": self.name, "precision": self.precision, "engine": self.engine})

    def _check_within_budget(self, messages: list[dict], cancel=None) -> Verdict:
        budget = self.settings.token_budget
        whole = self._encode_conversation(messages)
        if len(whole) <= budget:  # the common case: one tokenization, reused for the check
            return self._classify(messages, whole, cancel)
        sizes = [len(self._encode_conversation([m])) for m in messages]
        if sizes[-1] > budget:
            return self._check_windows(messages, cancel)
        start = len(messages) - 1
        # Keep the most recent messages that fit, always starting the window on a user message.
        while start >= 2 and sum(sizes[start - 2 :]) <= budget:
            start -= 2
        if start % 2 == 1 and sum(sizes[start - 1 :]) <= budget:
            start -= 1
        if start % 2 == 1:  # a reply whose user message does not fit beside it
            prompt = self._tail_text(messages[start - 1]["content"], budget - sizes[-1])
            return self._classify([{"role": "user", "content": prompt}, messages[-1]], cancel=cancel)
        return self._classify(messages[start:], cancel=cancel)

    def _tail_text(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return self.tokenizer.decode(ids[-max(max_tokens - 8, 0):]) if max_tokens > 8 else ""

    def _check_windows(self, messages: list[dict], cancel=None) -> Verdict:
        """A message longer than the budget: overlapping windows, the first unsafe one blocks."""
        s = self.settings
        last = messages[-1]
        context = []
        if last["role"] == "assistant":
            context = [{"role": "user", "content": self._tail_text(messages[-2]["content"], s.token_budget // 4)}]
        size = s.token_budget - (s.token_budget // 4 if context else 0) - 16
        ids = self.tokenizer(last["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        verdict = Verdict(True)
        for start in range(0, max(len(ids) - s.window_overlap, 1), size - s.window_overlap):
            window = self.tokenizer.decode(ids[start : start + size])
            verdict = self._classify(context + [{"role": last["role"], "content": window}], cancel=cancel)
            if not verdict.safe:
                return verdict
        return verdict

    def close(self) -> None:
        """Let go of what the checks hold (a connection); the local guard holds nothing to close."""
