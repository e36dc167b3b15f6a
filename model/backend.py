"""The `ChatBackend` seam: what the session needs from a chat model, wherever it runs.

The prompt is always built here, as token ids, from a local tokenizer (model.prompt: message text never
becomes a control token); a backend only turns those ids into generated ids. `model.runner.Runner` decodes
in this process with a KV cache kept across turns; `model.remote.RemoteChat` streams from an
OpenAI-compatible server (vLLM). Detokenizing, stop ids, the length budget, cancellation and the turn's
stats are the same for both.
"""

from __future__ import annotations

import datetime as _dt
import functools
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

from model.detok import TextStream
from model.errors import ContextError
from model.prompt import encode_chat
from model.sampling import Sampling

MIN_REPLY_TOKENS = 16
REMEMBERED_REPLIES = 256


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the previous turn (or the server's prefix cache)
    new_tokens: int = 0
    ttft_s: float = 0.0
    decode_tok_s: float = 0.0
    prefill_tok_s: float = 0.0
    trimmed: bool = False  # oldest turns were dropped to fit the context window
    dropped_messages: int = 0
    stop_reason: str = ""  # eos, length or cancelled
    compiled_steps: int = 0  # decode steps that ran compiled (see model.compiled)
    sampling: dict = field(default_factory=dict)  # what the reply was sampled with (Sampling.to_dict)
    engine: str = ""  # what answered: local, or the server's address
    model: str = ""  # the model that answered (for a server: the name it serves it under)

    def to_dict(self) -> dict:
        return asdict(self)


class ChatBackend(ABC):
    """A chat model behind a local tokenizer. Subclasses set the attributes below and implement `_generate`."""

    tokenizer = None
    eos_ids: frozenset = frozenset()
    defaults: dict = {}  # the checkpoint's sampling defaults (model.loading.generation_defaults)
    context_window = 8192
    name = ""  # the model, as the user named it
    engine = "local"  # local, or the address of the server that generates
    device = "cpu"  # where it computes: cpu, cuda, mps, or remote
    quantize = ""  # the weight mode in use (local CPU modes; "" where it is not ours to choose)
    quantize_note = ""  # why the weight mode asked for is not the one in use (model.device.quantize_note)

    def __init__(self):
        self._replies: OrderedDict[str, tuple[int, ...]] = OrderedDict()  # reply text -> generated ids
        self._lock = threading.Lock()
        self.last_stats: TurnStats | None = None
        self.last_reply_ids: list[int] = []

    @abstractmethod
    def _generate(self, ids: list[int], sampling: Sampling, stats: TurnStats,
                  cancel: threading.Event | None) -> Iterator[int]:
        """Generated token ids after the prompt `ids`, one at a time; the caller stops reading at a stop id,
        at the length budget or when `cancel` is set (closing the generator). May set `stats.cached_tokens`,
        `prefill_tok_s`, `compiled_steps`, and `stop_reason` when it ends on its own."""

    def reset(self) -> None:
        """Forget the cached conversation (another conversation is opened)."""
        self._replies.clear()

    def clear_cache(self) -> None:
        """Drop cached keys and values only: the next turn computes its whole prompt (same prompt ids)."""

    def close(self) -> None:
        """Stop background work and let go of connections before the backend is replaced."""

    def describe(self) -> str:
        """Where replies come from, for a status bar: the device and weights, or the server."""
        return self.device + (f" {self.quantize}" if self.quantize not in ("", "bf16") else "")

    @functools.cached_property
    def _special_ids(self) -> frozenset:
        return frozenset(i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special)

    def _remember(self, text: str, ids: list[int]) -> None:
        if text and text == text.strip() and not self._special_ids.intersection(ids):
            self._replies[text] = tuple(ids)
            self._replies.move_to_end(text)
            while len(self._replies) > REMEMBERED_REPLIES:
                self._replies.popitem(last=False)

    def fit(self, messages: Sequence[dict], *, date, max_new_tokens: int) -> tuple[list[int], int]:
        """Prompt ids that leave room for the reply, dropping the oldest turns (never the system
        prompt, never the last message). Returns the ids and how many messages were dropped.
        The room kept is max_new_tokens, but at least MIN_REPLY_TOKENS (a smaller one would let the
        prompt grow until no reply fits) and at most half the window (a larger one would drop all history
        on every turn); the reply may still run on to the window's end."""
        messages = list(messages)
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        body = messages[len(head):]
        dropped = 0
        room = min(max(max_new_tokens, MIN_REPLY_TOKENS), self.context_window // 2)
        while True:
            ids = encode_chat(self.tokenizer, head + body, date=date, reply_ids=self._replies)
            if len(ids) + room <= self.context_window or len(body) <= 1:
                break
            cut = 2 if len(body) > 2 and body[1]["role"] == "assistant" else 1
            body, dropped = body[cut:], dropped + cut
        if len(ids) + MIN_REPLY_TOKENS > self.context_window:
            raise ContextError(
                f"The message is {len(ids)} tokens long; with the system prompt it does not fit the "
                f"{self.context_window}-token context window. Shorten it or raise the context size."
            )
        return ids, dropped

    def stream(self, messages: Sequence[dict], *, sampling: Sampling | None = None, date=None,
               cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the reply to `messages` as text deltas; `last_stats` holds its stats (updated as it decodes,
        so a status bar can read them live). Setting `cancel` (from any thread) stops before the next token."""
        s = (sampling or Sampling()).resolved(self.defaults)
        s.validate()
        with self._lock:
            t0 = time.perf_counter()
            ids, dropped = self.fit(messages, date=date or _dt.date.today(), max_new_tokens=s.max_new_tokens)
            budget = min(s.max_new_tokens, self.context_window - len(ids))
            stats = TurnStats(prompt_tokens=len(ids), trimmed=dropped > 0, dropped_messages=dropped,
                              sampling=s.to_dict(), engine=self.engine, model=self.name)
            self.last_stats = stats
            out = TextStream(self.tokenizer)
            tokens = self._generate(ids, s, stats, cancel)
            t_first = None
            try:
                for token in tokens:
                    if t_first is None:
                        t_first = time.perf_counter()
                        stats.ttft_s = t_first - t0
                    if token in self.eos_ids:
                        stats.stop_reason = "eos"
                        break
                    stats.new_tokens += 1
                    if stats.new_tokens > 1:
                        stats.decode_tok_s = (stats.new_tokens - 1) / (time.perf_counter() - t_first)
                    delta = out.push(token)
                    if delta:
                        yield delta
                    if stats.new_tokens >= budget:
                        stats.stop_reason = "length"
                        break
                    if cancel is not None and cancel.is_set():
                        stats.stop_reason = "cancelled"
                        break
                else:  # the backend ended the reply (a server's finish reason), or was cancelled while waiting
                    if cancel is not None and cancel.is_set():
                        stats.stop_reason = "cancelled"
                    stats.stop_reason = stats.stop_reason or "eos"
            finally:
                tokens.close()
            self.last_reply_ids = out.ids
            tail = out.flush()
            self._remember(out.text, out.ids)
            if tail:
                yield tail
