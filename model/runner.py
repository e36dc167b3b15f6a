"""Streamed chat generation with a KV cache kept across turns.

Each turn encodes the whole conversation, finds the longest token prefix already in the cache, crops
the cache there and prefills only the rest. Edits, regenerations and a new date therefore recompute
exactly what changed, and greedy output is the same with or without reuse.
"""

from __future__ import annotations

import datetime as _dt
import threading
from collections import OrderedDict
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

from model.attention import use_grouped_attention
from model.detok import TextStream
from model.errors import ContextError
from model.kvcache import PrefixCache, common_prefix, new_cache
from model.loading import Loaded, Source, load_checkpoint, paused_gc, resolve_source
from model.prompt import encode_chat
from model.sampling import Sampling, next_token

MIN_REPLY_TOKENS = 16
REMEMBERED_REPLIES = 256


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
    compiled_steps: int = 0  # decode steps that ran compiled (see model.compiled)
    sampling: dict = field(default_factory=dict)  # what the reply was sampled with (Sampling.to_dict)

    def to_dict(self) -> dict:
        return asdict(self)


def prefetch_weights(src, *, device: str = "auto", quantize: str = "bf16", cache_folder=None):
    """Start reading the cached quantized weights `Runner.load(src, ...)` will want (model.qcache.prefetch),
    or None (nothing cached, not a CPU mode). Needs no torch."""
    from model.qcache import prefetch

    source = src if isinstance(src, Source) else resolve_source(src)
    return prefetch(source, quantize, cache_folder) if quantize != "bf16" and device in ("auto", "cpu") else None


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
        use_grouped_attention(self.model)
        from model.packed import pack_linears

        # The decoder's projections only: a tied output layer shares its weight with the embedding.
        pack_linears(self.model.get_decoder())
        self._kv = PrefixCache(self.model)
        self._replies: OrderedDict[str, tuple[int, ...]] = OrderedDict()  # reply text -> generated ids
        self._special_ids = {i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        self._lock = threading.Lock()
        self.last_stats: TurnStats | None = None
        self.last_reply_ids: list[int] = []
        self.quantize = "bf16"
        self.quantize_note = ""  # why the weight mode asked for is not the one in use (model.device.quantize_note)
        self.compiled = None  # a model.compiled.CompiledDecoder once `compile_decoding` is called

    @classmethod
    def load(cls, src, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
             context_window: int | None = None, quantize: str = "bf16", cache_folder=None,
             compile: bool = False, progress=None, prefetched=None) -> "Runner":
        """`quantize`: bf16 (none), int8, int4 or int4-fast (CPU; see model.quant), or auto (int4 on the
        CPU: model.device.pick_quantize). `compile`: decode with compiled steps once they are ready (see
        `compile_decoding`). `progress(text)` hears of slow steps (quantizing on a first start).
        `prefetched`: what `prefetch_weights` returned for the same arguments, started earlier."""
        source = resolve_source(src)
        # The quantized weights stream in from the cache while torch and transformers are imported.
        ahead = prefetched or prefetch_weights(source, device=device, quantize=quantize, cache_folder=cache_folder)
        try:
            with paused_gc():
                from model.device import configure_threads, pick_device, pick_dtype, quantize_note

                dev = pick_device(device)
                configure_threads(dev, threads)
                quantize, note = quantize_note(quantize, dev, pick_dtype(dtype, dev))
                if note and progress:
                    progress(note)
                if dtype == "auto" and source.kind == "gguf" and quantize == "bf16":
                    dtype = "float32"  # transformers' packed GGUF kernels compute in fp32
                loaded = load_checkpoint(source, device=dev, dtype=pick_dtype(dtype, dev), quantize=quantize,
                                         cache_folder=cache_folder, progress=progress, prefetched=ahead)
        finally:
            if ahead is not None:
                ahead.cancel()  # unused (a GPU, another entry) or done: stop reading
        runner = cls(loaded, device=dev, context_window=context_window)
        runner.quantize, runner.quantize_note = quantize, note
        if compile:
            runner.compile_decoding()
        return runner

    def compile_decoding(self, cache_folder=None) -> None:
        """Compile decode steps in the background; replies switch to them, between two tokens, as soon
        as the bucket of static cache they need is ready. Greedy output does not change. The first
        compile starts when the first reply ends, not at load: a reply sent while a bucket compiled
        decoded at 2.4-2.5 tok/s instead of ~28 (int4, 1B shape; tracing holds the GIL), and a first
        compile takes ~30 s on a fresh cache. Models that decode with the native step (model.step) stay
        eager: it beats the compiled transformers forward."""
        from model.compiled import CompiledDecoder
        from model.step import NativeStep

        if isinstance(self._kv.eager_step, NativeStep):
            return  # faster than compiled steps (int4, 1B shape: 35.9-45.8 vs 29.8-36.3 tok/s short, README)
        if self.compiled is None:
            self.compiled = CompiledDecoder(self.model, max_positions=self.context_window, cache_folder=cache_folder)

    def close(self) -> None:
        """Stop background work before the model is replaced (compiling, its caches)."""
        if self.compiled is not None:
            self.compiled.close()

    def _place(self, positions: int) -> None:
        """Hold the conversation in the smallest compiled bucket with room for `positions`, or in a
        dynamic cache (eager steps) while that bucket is still compiling."""
        self.compiled.want(positions)
        static = self.compiled.cache_for(positions)
        if static is not None:
            self._kv.move_to(static, self.compiled.step)
        elif self._kv.step is not None:
            self._kv.move_to(new_cache(self.model.config))

    @property
    def dtype(self):
        return self.model.dtype

    def reset(self) -> None:
        """Forget the cached conversation (another conversation is opened)."""
        self._kv.reset()
        self._replies.clear()

    def clear_cache(self) -> None:
        """Drop the KV cache only: the next turn prefills everything (same prompt ids)."""
        self._kv.reset()

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
            stats = TurnStats(prompt_tokens=len(ids), trimmed=dropped > 0, dropped_messages=dropped,
                              sampling=s.to_dict())
            self.last_stats = stats
            generator = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
            out = TextStream(self.tokenizer)
            if self.compiled is not None:
                self.compiled.pause()  # no compiling beside a decoding reply
            try:
                with torch.inference_mode():
                    t = time.perf_counter()
                    if self.compiled is not None:
                        self._kv.crop(common_prefix(self._kv.ids, ids))
                        self._place(len(ids))
                    logits, stats.cached_tokens = self._kv.extend_to(ids)
                    dt = time.perf_counter() - t
                    stats.prefill_tok_s = (len(ids) - stats.cached_tokens) / dt if dt > 0 else 0.0
                    token = next_token(logits, s, generator, self._kv.ids[-s.repeat_last_n:])
                    t_first = time.perf_counter()
                    stats.ttft_s = t_first - t0
                    while True:
                        if token in self.eos_ids:
                            stats.stop_reason = "eos"
                            break
                        stats.new_tokens += 1
                        if stats.new_tokens > 1:  # kept current while decoding: a status bar reads it live
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
                        if self.compiled is not None:
                            self._place(len(self._kv.ids) + 1)
                            stats.compiled_steps += self._kv.step is not None
                        logits = self._kv.forward([token])
                        token = next_token(logits, s, generator, self._kv.ids[-s.repeat_last_n:])
                    elapsed = time.perf_counter() - t_first
                    if stats.new_tokens > 1 and elapsed > 0:
                        stats.decode_tok_s = (stats.new_tokens - 1) / elapsed
            finally:
                if self.compiled is not None:
                    self.compiled.resume()
            self.last_reply_ids = out.ids
            tail = out.flush()
            self._remember(out.text, out.ids)
            if tail:
                yield tail
