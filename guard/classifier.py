"""Llama Guard 3 in this process: one forward pass for P(unsafe), a short decode only when unsafe.

The prompt head (policy and task line, one per judged role) stays in a per-role KV cache, so a check
computes only the conversation, the fixed tail and the `\\n\\n` token the model writes first, and
only the two output rows that matter ('safe', 'unsafe'); an unsafe verdict's category line is decoded
over the rows a category line can hold. Because that fast path cannot see a model that answers
something else entirely, loading runs a self-test on the full vocabulary and refuses a model that does
not answer like Llama Guard (an int8 guard read from its cache skips it: the start that built it ran it
on the same weights, guard.precision). So the output layer is read in full only by the self-test, and an
int8 guard keeps it memory-mapped (model.qcache): its 0.26 GB (1B shape) stay on disk. Any error while
screening returns a blocking verdict: the guard fails closed (guard.moderator).
"""

from __future__ import annotations

from guard.moderator import (MAX_CATEGORY_TOKENS, SELF_TEST, CheckCancelled, GuardError, GuardSettings, Moderator,
                             not_a_guard)
from model.kvcache import PrefixCache

DEFAULT_GUARD = "meta-llama/Llama-Guard-3-1B"
__all__ = ["DEFAULT_GUARD", "CheckCancelled", "Guard", "GuardError", "GuardSettings"]


class Guard(Moderator):
    """A loaded Llama Guard model and the KV of its prompt heads."""

    def __init__(self, model, tokenizer, *, name: str, settings: GuardSettings | None = None, self_test: bool = True):
        super().__init__(tokenizer, name=name, settings=settings)
        from guard.fastpath import optimise_for_checks
        from guard.precision import full_precision_name
        from model.attention import use_grouped_attention
        from model.packed import pack_linears
        from model.quant import QLinear

        self.model = model
        optimise_for_checks(model)
        pack_linears(model.get_decoder())  # the output layer stays plain: a check reads two of its rows
        use_grouped_attention(model)
        self.precision = "int8" if any(isinstance(m, QLinear) for m in model.modules()) else full_precision_name(model.dtype)
        self._kv = {r: PrefixCache(model) for r in ("User", "Agent")}
        self._category_rows = category_rows(tokenizer, self.settings.policy, self._eot)
        self.warm(self_test)

    @classmethod
    def load(cls, src: str = DEFAULT_GUARD, *, device: str = "auto", dtype: str = "auto",
             settings: GuardSettings | None = None, precision: str = "bf16", progress=None) -> "Guard":
        """`precision`: bf16 (unquantized, in `dtype`), int8 or auto (int8 on a CPU where the native kernel
        runs; guard.precision). int8 is used only after it judges the probe set as full precision does;
        `precision_note` says when and why it was not. `progress(text)` hears of slow first-start steps."""
        from model.loading import load_checkpoint, paused_gc, resolve_source

        settings = settings or GuardSettings()
        with paused_gc():
            from model.device import configure_threads, pick_device, pick_dtype

            from guard.precision import load_int8, pick_precision

            dev = pick_device(device)
            configure_threads(dev)
            source = resolve_source(src)
            torch_dtype = pick_dtype(dtype, dev)
            want, note = pick_precision(precision, dev)
            if want == "int8":
                return load_int8(cls, source, torch_dtype, settings, progress)
            loaded = load_checkpoint(source, device=dev, dtype=torch_dtype)
        guard = cls(loaded.model, loaded.tokenizer, name=source.name, settings=settings)
        guard.precision_note = note
        return guard

    def warm(self, self_test: bool = True) -> None:
        """Compute both prompt heads once (every later check reuses their KV), then (`self_test`) check on
        the full vocabulary that the model's verdict token is 'safe' or 'unsafe', as Llama Guard's is."""
        import torch

        with self._lock, torch.inference_mode():
            for role, kv in self._kv.items():
                kv.extend_to(self._heads[role], rows=())  # no logits: the head is followed by a conversation
            if not self_test:
                return
            ids = self.prompt_ids(SELF_TEST)
            probs = torch.softmax(self._kv["User"].extend_to(ids)[0].float(), dim=-1)
        mass = float(probs[self._safe] + probs[self._unsafe])
        if mass < 0.5:
            raise not_a_guard(self.name, self.tokenizer.decode([int(torch.argmax(probs))]), mass)

    def _judge(self, role: str, ids: list[int], cancel=None) -> tuple[float, str]:
        import torch

        kv = self._kv[role]
        with torch.inference_mode():
            logits, _ = kv.extend_to(ids, rows=(self._safe, self._unsafe), cancel=cancel)
            score = float(torch.softmax(logits.float(), dim=-1)[1])  # P(unsafe) between the two answers
            return score, (self._decode_from(kv, self._unsafe) if score >= self.settings.threshold else "safe")

    def _decode_from(self, kv: PrefixCache, first: int) -> str:
        """Greedy decode after the verdict token for the category line, over the tokens one can hold."""
        import torch

        rows = self._category_rows
        out, token = [first], first
        for _ in range(MAX_CATEGORY_TOKENS):
            token = rows[int(torch.argmax(kv.forward([token], rows=rows)))]
            if token == self._eot:
                break
            out.append(token)
        return self.tokenizer.decode(out, skip_special_tokens=False)


def category_rows(tokenizer, policy: dict, eot: int) -> tuple[int, ...]:
    """The tokens of every category line Llama Guard 3 writes after 'unsafe' ("\\nS1", "\\nS2,S10", ...) for
    the policy's codes and S1-S14 (a code outside the policy is read as unreadable, guard.verdict), and
    the end of turn."""
    ids = {eot}
    for code in {*policy, *(f"S{i}" for i in range(1, 15))}:
        for piece in (f"\n{code}", f",{code}"):  # a line's first code, and each one after a comma
            ids.update(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return tuple(sorted(ids))
