"""The cache layer decoding appends into: keys and values grow in place, in spare room."""

from __future__ import annotations

import functools

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
