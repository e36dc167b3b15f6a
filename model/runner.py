"""Streamed chat generation with a KV cache kept across turns.

Each turn encodes the whole conversation, finds the longest token prefix already in the cache, crops
the cache there and prefills only the rest. Edits, regenerations and a new date therefore recompute
exactly what changed, and greedy output is the same with or without reuse.
"""

from __future__ import annotations

import datetime as _dt
import threading
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

from model.detok import TextStream
from model.errors import ContextError
from model.loading import Loaded, load_checkpoint, resolve_source
from model.prompt import encode_chat
from model.sampling import Sampling, next_token

PREFILL_CHUNK = 512  # bounds activation memory on long prompts
MIN_REPLY_TOKENS = 16


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the previous turn
    new_tokens: int = 0
    ttft_s: float = 0.0
    decode_tok_s: float = 0.0
    prefill_tok_s: float = 0.0
    trimmed: bool = False  # oldest turns were dropped to fit the context window
    dropped_messages: int = 0
    stop_reason: str = ""  # eos, length or cancelled

    def to_dict(self) -> dict:
        return asdict(self)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Runner:
    """One loaded chat model and the KV cache of the conversation it last answered."""

    def __init__(self, loaded: Loaded, *, device: str, context_window: int | None = None):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.source = loaded.source
        self.eos_ids = frozenset(loaded.eos_ids)
        self.defaults = loaded.generation_defaults
        self.device = device
        limit = getattr(self.model.config, "max_position_embeddings", 8192) or 8192
        self.context_window = min(context_window or (8192 if device == "cpu" else 32768), limit)
        self._cache = None
        self._cached_ids: list[int] = []
        self._lock = threading.Lock()
        self.last_stats: TurnStats | None = None
        self.last_reply_ids: list[int] = []

    @classmethod
    def load(cls, src, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
             context_window: int | None = None) -> "Runner":
        from model.device import configure_threads, pick_device, pick_dtype

        dev = pick_device(device)
        configure_threads(dev, threads)
        source = resolve_source(src)
        if dtype == "auto" and source.kind == "gguf":
            dtype = "float32"  # transformers' packed GGUF kernels compute in fp32
        loaded = load_checkpoint(source, device=dev, dtype=pick_dtype(dtype, dev))
        return cls(loaded, device=dev, context_window=context_window)

    @property
    def dtype(self):
        return self.model.dtype

    def reset(self) -> None:
        """Forget the cached conversation (another conversation is opened)."""
        self._cache, self._cached_ids = None, []

    def fit(self, messages: Sequence[dict], *, date, max_new_tokens: int) -> tuple[list[int], int]:
        """Prompt ids that leave room for the reply, dropping the oldest turns (never the system
        prompt, never the last message). Returns the ids and how many messages were dropped."""
        messages = list(messages)
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        body = messages[len(head):]
        dropped = 0
        while True:
            ids = encode_chat(self.tokenizer, head + body, date=date)
            if len(ids) + max_new_tokens <= self.context_window or len(body) <= 1:
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
        """Yield the reply to `messages` as text deltas; `last_stats` holds its stats afterwards.

        Setting `cancel` (from any thread) stops generation before the next token.
        """
        import torch

        s = (sampling or Sampling()).resolved(self.defaults)
        s.validate()
        with self._lock:
            t0 = time.perf_counter()
            ids, dropped = self.fit(messages, date=date or _dt.date.today(), max_new_tokens=s.max_new_tokens)
            budget = min(s.max_new_tokens, self.context_window - len(ids))
            stats = TurnStats(prompt_tokens=len(ids), trimmed=dropped > 0, dropped_messages=dropped)
            self.last_stats = stats
            generator = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
            out = TextStream(self.tokenizer)
            try:
                with torch.inference_mode():
                    logits = self._prefill(ids, stats)
                    token = next_token(logits, s, generator)
                    t_first = time.perf_counter()
                    stats.ttft_s = t_first - t0
                    while True:
                        if token in self.eos_ids:
                            stats.stop_reason = "eos"
                            break
                        stats.new_tokens += 1
                        delta = out.push(token)
                        if delta:
                            yield delta
                        if stats.new_tokens >= budget:
                            stats.stop_reason = "length"
                            break
                        if cancel is not None and cancel.is_set():
                            stats.stop_reason = "cancelled"
                            break
                        logits = self._forward([token])
                        token = next_token(logits, s, generator)
                    elapsed = time.perf_counter() - t_first
                    if stats.new_tokens > 1 and elapsed > 0:
                        stats.decode_tok_s = (stats.new_tokens - 1) / elapsed
            except GeneratorExit:  # the consumer stopped reading; the cache is consistent between tokens
                raise
            except BaseException:  # a failure inside a forward pass leaves the cache half-updated
                self.reset()
                raise
            self.last_reply_ids = out.ids
            tail = out.flush()
            if tail:
                yield tail

    def _forward(self, ids: list[int]):
        import torch

        from transformers import DynamicCache

        if self._cache is None:
            self._cache = DynamicCache(config=self.model.config)
        x = torch.tensor([ids], device=self.model.device)
        out = self.model(input_ids=x, cache=self._cache, use_cache=True, logits_to_keep=1)
        self._cached_ids.extend(ids)
        return out.logits[0, -1]

    def _prefill(self, ids: list[int], stats: TurnStats):
        keep = min(common_prefix(self._cached_ids, ids), len(ids) - 1)
        if self._cache is not None and keep < len(self._cached_ids):
            if keep == 0:
                self.reset()
            else:
                self._cache.crop(keep - len(self._cached_ids))  # negative: tokens to remove
                del self._cached_ids[keep:]
        stats.cached_tokens = keep
        t = time.perf_counter()
        logits = None
        for start in range(keep, len(ids), PREFILL_CHUNK):
            logits = self._forward(ids[start : start + PREFILL_CHUNK])
        dt = time.perf_counter() - t
        stats.prefill_tok_s = (len(ids) - keep) / dt if dt > 0 else 0.0
        return logits

    def count_tokens(self, messages: Sequence[dict], *, date=None) -> int:
        return len(encode_chat(self.tokenizer, messages, date=date or _dt.date.today()))
