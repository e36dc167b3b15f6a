"""A KV cache that remembers which token ids it holds, so a new prompt prefills only what changed."""

from __future__ import annotations

import functools
from typing import Sequence

PREFILL_CHUNK = 512  # bounds activation memory on long prompts
CANCEL_CHUNK = 128  # a cancellable prefill's chunk: how often it looks at its cancel event


class Cancelled(Exception):
    """A cancellable forward pass was cancelled between chunks (the cache keeps what it computed)."""
GROW = 256  # positions a growing cache layer adds at least when it runs out of room


def new_cache(config):
    """A transformers DynamicCache whose full-attention layers grow in place (`growing_layer_type`)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    cache.layers = [growing_layer_type()() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@functools.cache
def growing_layer_type():
    """A DynamicLayer that appends into spare room instead of concatenating: transformers' own copies the
    whole layer every token (at 1k tokens of context, 32 MB a token on the 1B shape). Its keys and values
    are views of buffers that grow by a quarter (at least GROW positions) when full."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        buffers = None

        def reserve(self, positions: int, like):
            """Room for `positions` in all (grown if needed, `like`'s batch, heads, dim, dtype, device);
            returns the (keys, values) buffers."""
            if not self.is_initialized:
                self.lazy_initialization(like, like)
            n = self.get_seq_length()
            if self.buffers is None or positions > self.buffers[0].shape[-2]:
                b, h, _, d = like.shape
                room = positions + max(GROW, positions // 4)
                grown = [torch.empty(b, h, room, d, dtype=like.dtype, device=like.device) for _ in range(2)]
                if n:
                    grown[0][:, :, :n].copy_(self.keys)
                    grown[1][:, :, :n].copy_(self.values)
                self.buffers = grown
            return self.buffers

        def advance(self, n: int):
            """The first `n` positions of the buffers are the cached keys and values."""
            keys, values = self.buffers
            self.keys, self.values = keys[:, :, :n], values[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            n, new = self.get_seq_length(), key_states.shape[-2]
            keys, values = self.reserve(n + new, key_states)
            keys[:, :, n : n + new].copy_(key_states)
            values[:, :, n : n + new].copy_(value_states)
            self.advance(n + new)
            return self.keys, self.values

        def reset(self):
            self.buffers = None
            super().reset()

    return GrowingLayer


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """The transformers DynamicCache of one model plus the ids whose keys and values it holds."""

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.ids: list[int] = []
        self.step = None  # a compiled one-token step for `cache` (see model.compiled), or None: eager
        from model.step import eager_step

        self.eager_step = eager_step(model)

    def reset(self) -> None:
        self.cache, self.ids, self.step = None, [], None

    def move_to(self, cache, step=None) -> None:
        """Carry the cached positions over to `cache` (a DynamicCache or a StaticCache large enough),
        decoding with `step` from then on."""
        if cache is self.cache:
            return
        n = len(self.ids)
        if cache.get_seq_length():
            cache.crop(-int(cache.get_seq_length()))
        if self.cache is not None and n:
            for i, layer in enumerate(self.cache.layers):
                cache.update(layer.keys[:, :, :n], layer.values[:, :, :n], i)
        self.cache, self.step = cache, step

    def crop(self, n: int) -> None:
        """Keep the first `n` positions."""
        if n <= 0:
            self.reset()
        elif n < len(self.ids):
            self.cache.crop(n - len(self.ids))  # a negative count removes that many from the end
            del self.ids[n:]

    def forward(self, ids: Sequence[int], rows: Sequence[int] | None = None, cancel=None):
        """Run `ids` after what is cached; return the logits of the last position: the whole vocabulary,
        or only the output rows `rows` (the rest of the output layer is then never read). With `cancel` (a
        threading.Event) it raises Cancelled, between smaller chunks, once the event is set."""
        import torch

        if self.cache is None:
            self.cache = new_cache(self.model.config)
        logits = None
        size = PREFILL_CHUNK if cancel is None else CANCEL_CHUNK
        for start in range(0, len(ids), size):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            chunk = list(ids[start : start + size])
            x = torch.tensor([chunk], device=self.model.device)
            last = start + size >= len(ids)
            try:
                if rows is not None and last:
                    hidden = self.model.get_decoder()(input_ids=x, cache=self.cache, use_cache=True).last_hidden_state
                    head = self.model.get_output_embeddings()
                    weight = head.dequantized(rows) if hasattr(head, "dequantized") else head.weight[list(rows)]
                    logits = torch.nn.functional.linear(hidden[0, -1], weight)
                elif len(chunk) == 1 and (self.step or self.eager_step):
                    logits = (self.step or self.eager_step)(x, self.cache)
                else:
                    logits = self.model(input_ids=x, cache=self.cache, use_cache=True, logits_to_keep=1).logits[0, -1]
            except BaseException:
                self.reset()  # a failed forward leaves some layers updated and others not
                raise
            self.ids.extend(chunk)
        return logits

    def extend_to(self, ids: Sequence[int], rows: Sequence[int] | None = None, cancel=None):
        """Make the cache hold exactly `ids` and return the last position's logits (see `forward`);
        reuses the longest common prefix, always recomputing at least the last id.
        Returns (logits, reused_count)."""
        keep = min(common_prefix(self.ids, ids), len(ids) - 1)
        self.crop(keep)
        return self.forward(ids[keep:], rows, cancel), keep
