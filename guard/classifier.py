"""Llama Guard 3 classification: one forward pass for P(unsafe), a short decode only when unsafe.

The prompt head (policy and task line, one per judged role) stays in a per-role KV cache, so a check
computes only the conversation, the fixed tail and the `\\n\\n` token the model writes first, and
only the two output rows that matter ('safe', 'unsafe'). Because that fast path cannot see a model
that answers something else entirely, loading runs a self-test on the full vocabulary and refuses a
model that does not answer like Llama Guard. Any error while screening returns a blocking verdict:
the guard fails closed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from guard.categories import LLAMA_GUARD_3_CATEGORIES
from guard.prompt import check_conversation, conversation_text, head_parts, judged_role, tail_parts
from guard.verdict import Verdict, parse_verdict
from model.errors import LlamaChatError
from model.kvcache import Cancelled, PrefixCache
from model.prompt import encode_parts, is_llama3_tokenizer

DEFAULT_GUARD = "meta-llama/Llama-Guard-3-1B"
MAX_CATEGORY_TOKENS = 12
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


class Guard:
    """A loaded Llama Guard model and the KV of its prompt heads."""

    def __init__(self, model, tokenizer, *, name: str, settings: GuardSettings | None = None):
        if not is_llama3_tokenizer(tokenizer):
            raise GuardError(f"{name} does not have the Llama 3 tokenizer Llama Guard 3 needs.")
        from guard.fastpath import optimise_for_checks

        from model.attention import use_grouped_attention
        from model.packed import pack_linears

        self.model, self.tokenizer, self.name = model, tokenizer, name
        optimise_for_checks(model)
        pack_linears(model.get_decoder())  # the output layer stays plain: a check reads two of its rows
        use_grouped_attention(model)
        self.settings = settings or GuardSettings()
        from guard.precision import full_precision_name
        from model.quant import QLinear

        self.precision = "int8" if any(isinstance(m, QLinear) for m in model.modules()) else full_precision_name(model.dtype)
        self.precision_note = ""  # why the precision asked for is not the one in use (guard.precision)
        self._nn = self._single_token("\n\n")
        self._safe, self._unsafe = self._single_token("safe"), self._single_token("unsafe")
        self._eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
        self._lock = threading.RLock()
        s = self.settings
        self._heads = {r: encode_parts(tokenizer, head_parts(r, s.categories, s.excluded)) for r in ("User", "Agent")}
        self._tails = {r: encode_parts(tokenizer, tail_parts(r)) for r in ("User", "Agent")}
        self._kv = {r: PrefixCache(model) for r in ("User", "Agent")}
        self.warm()

    @classmethod
    def load(cls, src: str = DEFAULT_GUARD, *, device: str = "auto", dtype: str = "auto",
             settings: GuardSettings | None = None, precision: str = "bf16", progress=None) -> "Guard":
        """`precision`: bf16 (unquantized, in `dtype`), int8 or auto (int8 on a CPU where the native kernel
        runs; guard.precision). int8 is used only after it judges the probe set as full precision does;
        `precision_note` says when and why it was not. `progress(text)` hears of slow first-start steps."""
        from model.loading import load_checkpoint, paused_gc, resolve_source

        settings = settings or GuardSettings()
        with paused_gc():
            from model.device import configure_threads, pick_device, pick_dtype

            from guard.precision import load_int8, pick_precision

            dev = pick_device(device)
            configure_threads(dev)
            source = resolve_source(src)
            torch_dtype = pick_dtype(dtype, dev)
            want, note = pick_precision(precision, dev)
            if want == "int8":
                return load_int8(cls, source, torch_dtype, settings, progress)
            loaded = load_checkpoint(source, device=dev, dtype=torch_dtype)
        guard = cls(loaded.model, loaded.tokenizer, name=source.name, settings=settings)
        guard.precision_note = note
        return guard

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise GuardError(f"{self.name}: {text!r} is not one token in its tokenizer; is this Llama Guard 3?")
        return ids[0]

    def warm(self) -> None:
        """Compute both prompt heads once (every later check reuses their KV), then check on the full
        vocabulary that the model's verdict token is 'safe' or 'unsafe', as Llama Guard's is."""
        import torch

        with self._lock, torch.inference_mode():
            for role, kv in self._kv.items():
                kv.extend_to(self._heads[role])
            ids = self._heads["User"] + self._encode_conversation(SELF_TEST) + self._tails["User"] + [self._nn]
            probs = torch.softmax(self._kv["User"].extend_to(ids)[0].float(), dim=-1)
        mass = float(probs[self._safe] + probs[self._unsafe])
        if mass < 0.5:
            top = self.tokenizer.decode([int(torch.argmax(probs))])
            raise GuardError(
                f"{self.name} does not answer like Llama Guard 3: its verdict token was {top!r}, not 'safe' or "
                f"'unsafe' (they got {mass:.0%} of the probability). Point the guard at Llama-Guard-3-1B.",
                title="Not a guard model",
            )

    # -- scoring ---------------------------------------------------------------------------------
    def _encode_conversation(self, messages: Sequence[dict]) -> list[int]:
        return self.tokenizer(conversation_text(messages), add_special_tokens=False,
                              split_special_tokens=True)["input_ids"]

    def _classify(self, messages: Sequence[dict], conversation_ids: list[int] | None = None, cancel=None) -> Verdict:
        """One check of a conversation that fits the budget. Raises on internal errors."""
        import torch

        role = judged_role(messages)
        kv = self._kv[role]
        if conversation_ids is None:
            conversation_ids = self._encode_conversation(messages)
        ids = self._heads[role] + conversation_ids + self._tails[role] + [self._nn]
        with torch.inference_mode():
            logits, _ = kv.extend_to(ids, rows=(self._safe, self._unsafe), cancel=cancel)
            score = float(torch.softmax(logits.float(), dim=-1)[1])  # P(unsafe) between the two answers
            if score < self.settings.threshold:
                return Verdict(True, score=score, raw="safe")
            raw = self._decode_from(kv, self._unsafe)
        allowed = [c for c in self.settings.policy if c not in self.settings.excluded]
        v = parse_verdict(raw, allowed, self.settings.excluded, self.settings.policy)
        return Verdict(v.safe, v.categories, v.category_names, score, reason=v.reason, raw=raw)

    def _decode_from(self, kv: PrefixCache, first: int) -> str:
        """Greedy decode after the verdict token, on the full vocabulary, for the category line."""
        import torch

        out, token = [first], first
        for _ in range(MAX_CATEGORY_TOKENS):
            token = int(torch.argmax(kv.forward([token])))
            if token == self._eot:
                break
            out.append(token)
        return self.tokenizer.decode(out, skip_special_tokens=False)

    # -- the public checks -----------------------------------------------------------------------
    def check(self, messages: Sequence[dict], *, stage: str | None = None, cancel=None) -> Verdict:
        """Screen the last message of an alternating user/assistant conversation. Never raises for a
        screening failure: errors come back as blocking verdicts. `cancel` (a threading.Event) set while
        it runs raises CheckCancelled: no verdict, and so nothing passed."""
        t0 = time.perf_counter()
        stage = stage or ("input" if len(messages) % 2 == 1 else "output")
        try:
            check_conversation(messages)
            with self._lock:
                verdict = self._check_within_budget(list(messages), cancel)
        except Cancelled:
            raise CheckCancelled(f"The {stage} check was cancelled before it finished.") from None
        except Exception as e:  # fail closed: a guard that cannot answer blocks
            verdict = Verdict(False, reason=f"guard error: {type(e).__name__}: {e}")
        return Verdict(**{**verdict.__dict__, "stage": stage, "latency_s": time.perf_counter() - t0,
                          "guard_model": self.name, "precision": self.precision})

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
