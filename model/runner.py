"""Streamed chat generation with a KV cache kept across turns.

Each turn encodes the whole conversation, finds the longest token prefix already in the cache, crops
the cache there and prefills only the rest. Edits, regenerations and a new date therefore recompute
exactly what changed, and greedy output is the same with or without reuse.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

from model.attention import use_grouped_attention
from model.backend import ChatBackend, TurnStats
from model.growing import new_cache
from model.kvcache import PrefixCache, common_prefix
from model.loading import Loaded, Source, load_checkpoint, paused_gc, resolve_source
from model.sampling import Sampling, next_token

__all__ = ["Runner", "TurnStats", "prefetch_weights"]


def prefetch_weights(src, *, device: str = "auto", quantize: str = "bf16", cache_folder=None):
    """Start reading the cached quantized weights `Runner.load(src, ...)` will want (model.qcache.prefetch),
    or None (nothing cached, not a CPU mode). Needs no torch."""
    from model.qcache import prefetch

    source = resolve_source(src)
    return prefetch(source, quantize, cache_folder) if quantize != "bf16" and device in ("auto", "cpu") else None


class Runner(ChatBackend):
    """One loaded chat model and the KV cache of the conversation it last answered."""

    def __init__(self, loaded: Loaded, *, device: str, context_window: int | None = None):
        super().__init__()
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.source = loaded.source
        self.name = loaded.source.name
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
        self.quantize = "bf16"
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
        super().reset()
        self._kv.reset()

    def clear_cache(self) -> None:
        """Drop the KV cache only: the next turn prefills everything (same prompt ids)."""
        self._kv.reset()

    def _generate(self, ids: list[int], sampling: Sampling, stats: TurnStats,
                  cancel: threading.Event | None) -> Iterator[int]:
        """Prefill what the KV cache lacks of `ids`, then decode one token per step."""
        import torch

        s = sampling
        generator = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
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
                while True:
                    token = next_token(logits, s, generator, self._kv.ids[-s.repeat_last_n:])
                    yield token
                    if self.compiled is not None:
                        self._place(len(self._kv.ids) + 1)
                        stats.compiled_steps += self._kv.step is not None
                    logits = self._kv.forward([token])
        finally:
            if self.compiled is not None:
                self.compiled.resume()
