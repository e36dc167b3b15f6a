"""Next-token choice: a repetition penalty, then greedy at temperature 0, else temperature, top-k and top-p
sampling."""

from __future__ import annotations

from dataclasses import dataclass

NUCLEUS_PROBE = 256  # next_token: how many of the highest probabilities are looked at first for top-p


@dataclass
class Sampling:
    """How a reply is sampled. `None` fields take the checkpoint's generation defaults."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    max_new_tokens: int = 512
    repetition_penalty: float | None = None  # llama.cpp's and Ollama's repeat_penalty; 1 is off
    # How many of the latest ids (prompt and reply) the penalty looks at: llama.cpp's 64 let SmolLM2 repeat a
    # paragraph of ~70 tokens greedily (transformers' penalty looks at the whole sequence).
    repeat_last_n: int = 256

    def resolved(self, defaults: dict) -> "Sampling":
        return Sampling(
            temperature=defaults.get("temperature", 0.6) if self.temperature is None else self.temperature,
            top_p=defaults.get("top_p", 1.0) if self.top_p is None else self.top_p,
            top_k=defaults.get("top_k", 0) if self.top_k is None else self.top_k,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
            repetition_penalty=(defaults.get("repetition_penalty", 1.0) if self.repetition_penalty is None
                                else self.repetition_penalty),
            repeat_last_n=self.repeat_last_n,
        )

    def to_dict(self) -> dict:
        """What a reply was sampled with, for its stored stats."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "repetition_penalty": self.repetition_penalty}

    def validate(self) -> None:
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be 0 or more, not {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or more, not {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.repetition_penalty is not None and not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be above 0 and at most 2 (1 is off), not {self.repetition_penalty}")


def penalize(logits, recent, penalty: float | None):
    """The repetition penalty of CTRL (Keskar et al. 2019), as llama.cpp, Ollama and transformers apply it:
    each id among `recent` has its logit divided by `penalty` where positive, multiplied where negative, so
    a token already written is less likely again. Returns new logits (float32)."""
    import torch

    if not penalty or penalty == 1.0 or not len(recent):
        return logits
    ids = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
    out = logits.float().clone()
    picked = out[ids]
    out[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def next_token(logits, s: Sampling, generator, recent=()) -> int:
    """Pick the next id from a 1-D logits row; `recent`: the latest ids, for the repetition penalty."""
    import torch

    logits = penalize(logits, recent, s.repetition_penalty)
    if not s.temperature:
        return int(torch.argmax(logits))
    scores = logits.float().cpu() / s.temperature
    if s.top_k and s.top_k < scores.numel():
        kth = torch.topk(scores, s.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if s.top_p is not None and s.top_p < 1.0:
        # The nucleus is the head of the probabilities in order: the NUCLEUS_PROBE highest (a partial sort)
        # hold it unless together they are top_p or less; only then sort them all.
        sorted_probs, order = torch.topk(probs, min(NUCLEUS_PROBE, probs.numel()))
        if float(sorted_probs.sum()) <= s.top_p:
            sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > s.top_p
        sorted_probs[outside] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
