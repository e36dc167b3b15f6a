"""A KV cache that remembers which token ids it holds, so a new prompt prefills only what changed."""

from __future__ import annotations

from typing import Sequence

from model.growing import new_cache

PREFILL_CHUNK = 512  # bounds activation memory on long prompts
CANCEL_CHUNK = 128  # a cancellable prefill's chunk: how often it looks at its cancel event


class Cancelled(Exception):
    """A cancellable forward pass was cancelled between chunks (the cache keeps what it computed)."""
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
        or only the output rows `rows` (the rest of the output layer is then never read; none for an empty
        `rows`). With `cancel` (a
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
                if rows is not None:  # the decoder alone, then at the end only the rows asked for
                    hidden = self.model.get_decoder()(input_ids=x, cache=self.cache, use_cache=True).last_hidden_state
                    if last and rows:
                        head = self.model.get_output_embeddings()
                        weight = head.dequantized(rows) if hasattr(head, "dequantized") else head.weight[list(rows)]
                        # in fp32: a quantized layer's rows come back fp32 whatever the activations' dtype
                        logits = torch.nn.functional.linear(hidden[0, -1].float(), weight.float())
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
