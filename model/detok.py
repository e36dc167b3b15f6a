"""Incremental detokenization: text deltas that never split a character across tokens."""

from __future__ import annotations


def _backend(tokenizer):
    """The `tokenizers` object a transformers tokenizer decodes with, where its decode adds nothing to it
    without clean-up (its own checks and conversions were most of the cost of decoding two windows per token);
    else None."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if isinstance(tokenizer, TokenizersBackend) and type(tokenizer)._decode is TokenizersBackend._decode:
        return tokenizer.backend_tokenizer
    return None


class TextStream:
    """Feed ids one by one; get back only text that is complete (no half UTF-8 sequence)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._backend = _backend(tokenizer)
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # ids already turned into text
        self.text = ""  # everything returned so far

    def _decode(self, ids) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            self.text += after[len(before) :]
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is left when the reply ends (an unfinished character shows as U+FFFD)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        self.text += after[len(before) :]
        return after[len(before) :]
