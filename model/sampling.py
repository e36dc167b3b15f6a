"""Next-token choice: greedy at temperature 0, else temperature, top-k and top-p sampling."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sampling:
    """How a reply is sampled. `None` fields take the checkpoint's generation defaults."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    max_new_tokens: int = 512

    def resolved(self, defaults: dict) -> "Sampling":
        return Sampling(
            temperature=defaults.get("temperature", 0.6) if self.temperature is None else self.temperature,
            top_p=defaults.get("top_p", 1.0) if self.top_p is None else self.top_p,
            top_k=defaults.get("top_k", 0) if self.top_k is None else self.top_k,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
        )

    def validate(self) -> None:
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be 0 or more, not {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or more, not {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")


def next_token(logits, s: Sampling, generator) -> int:
    """Pick the next id from a 1-D logits row."""
    import torch

    if not s.temperature:
        return int(torch.argmax(logits))
    scores = logits.float().cpu() / s.temperature
    if s.top_k and s.top_k < scores.numel():
        kth = torch.topk(scores, s.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if s.top_p is not None and s.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > s.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
