"""Llama Guard 3 served by vLLM: the same prompt as the local guard, as token ids, judged by the server.

P(unsafe) is read from the verdict token's log-probabilities (Meta's scoring: 'unsafe' against 'safe'), the
categories from the text generated after it. Anything unexpected (server down, a timeout, an HTTP error,
missing log-probabilities, a verdict token that is neither 'safe' nor 'unsafe') raises, and the check
blocks (guard.moderator). vLLM's prefix caching keeps the policy head and the conversation checked so far,
so the repeated checks of a streaming reply compute mostly what is new.
"""

from __future__ import annotations

import math

from guard.moderator import MAX_CATEGORY_TOKENS, SELF_TEST, GuardError, GuardSettings, Moderator, not_a_guard
from model.remote import OpenAIServer, RemoteError

TOP_LOGPROBS = 20  # vLLM's default limit on log-probabilities per token
CHECK_TIMEOUT_S = 30.0


class RemoteGuard(Moderator):
    """A Llama Guard 3 model on an OpenAI-compatible server, with prompts built from the local tokenizer."""

    precision = "remote"

    def __init__(self, server: OpenAIServer, tokenizer, *, served_model: str, settings: GuardSettings | None = None):
        super().__init__(tokenizer, name=served_model, settings=settings)
        self.server, self.served_model = server, served_model
        self.engine = f"vLLM {server.base_url}"
        self.self_test()

    @classmethod
    def connect(cls, base_url: str, *, tokenizer: str, served_model: str = "", api_key_env: str = "",
                settings: GuardSettings | None = None) -> "RemoteGuard":
        from model.loading import load_tokenizer, resolve_tokenizer

        server = OpenAIServer(base_url, api_key_env=api_key_env, timeout=CHECK_TIMEOUT_S)
        entry = server.pick_model(served_model)
        return cls(server, load_tokenizer(resolve_tokenizer(tokenizer)), served_model=entry["id"], settings=settings)

    def request(self, ids: list[int], max_tokens: int, **extra) -> dict:
        """The server's answer to one greedy completion of `ids`, with the top log-probabilities of each token
        (`extra`: more request fields, as bench.remote sends)."""
        body = {"model": self.served_model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                "logprobs": TOP_LOGPROBS, "return_tokens_as_token_ids": True, "return_token_ids": True,
                "stop_token_ids": [self._eot], "skip_special_tokens": False, "add_special_tokens": False, **extra}
        return self.server.post("/completions", body)

    def _complete(self, ids: list[int], max_tokens: int) -> dict:
        """One greedy completion's only choice."""
        choices = self.request(ids, max_tokens).get("choices") or []
        if len(choices) != 1:
            raise RemoteError(f"{self.server.base_url} answered a guard check with {len(choices)} choices, not one.")
        return choices[0]

    def _first_token(self, choice: dict) -> tuple[dict[int, float], list[int]]:
        """The verdict token's top probabilities by id, and the generated ids."""
        tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
        ids = choice.get("token_ids")
        if not tops or not isinstance(tops[0], dict) or not ids:
            raise RemoteError(f"{self.server.base_url} sent no log-probabilities (or no token ids) for the guard's "
                              "verdict; it must be vLLM's OpenAI-compatible server.")
        probs = {}
        for key, logprob in tops[0].items():
            if not key.startswith("token_id:"):
                raise RemoteError(f"{self.server.base_url} named a token {key!r}, not by its id; is it vLLM?")
            probs[int(key[len("token_id:"):])] = math.exp(logprob) if logprob is not None else 0.0
        return probs, ids

    def self_test(self) -> None:
        """Refuse a server model whose verdict token is not 'safe' or 'unsafe' (not Llama Guard 3)."""
        probs, ids = self._first_token(self._complete(self.prompt_ids(SELF_TEST), 1))
        mass = probs.get(self._safe, 0.0) + probs.get(self._unsafe, 0.0)
        if mass < 0.5:
            raise not_a_guard(f"{self.served_model} at {self.server.base_url}", self.tokenizer.decode(ids[:1]), mass)

    def _judge(self, role: str, ids: list[int], cancel=None) -> tuple[float, str]:
        from model.kvcache import Cancelled

        if cancel is not None and cancel.is_set():
            raise Cancelled
        choice = self._complete(ids, MAX_CATEGORY_TOKENS + 1)
        if cancel is not None and cancel.is_set():
            raise Cancelled  # the verdict came too late for its caller: it is not used
        probs, generated = self._first_token(choice)
        safe, unsafe = probs.get(self._safe, 0.0), probs.get(self._unsafe, 0.0)
        if generated[0] not in (self._safe, self._unsafe) or safe + unsafe == 0:
            first = self.tokenizer.decode(generated[:1])
            raise GuardError(f"{self.served_model} at {self.server.base_url} answered {first!r}, neither 'safe' nor "
                             "'unsafe': is it Llama Guard 3?")
        score = unsafe / (safe + unsafe)
        if score < self.settings.threshold:
            return score, "safe"
        if generated[0] != self._unsafe:  # the threshold is under 0.5: the categories follow a forced 'unsafe'
            generated = [self._unsafe] + self._complete(ids + [self._unsafe], MAX_CATEGORY_TOKENS).get("token_ids", [])
        return score, self.tokenizer.decode([i for i in generated if i != self._eot], skip_special_tokens=False)
