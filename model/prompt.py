"""Chat prompts as text and as token ids, with user text kept out of the control tokens.

`render_chat` reproduces the official Llama 3.2 Instruct chat template byte for byte. `encode_chat`
turns a conversation into ids where only the template itself can produce special-token ids: message
text is tokenized with special-token matching switched off, so a user who types `<|eot_id|>` gets
those characters, not the token.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Iterable, Sequence

KNOWLEDGE_CUTOFF = "December 2023"
LLAMA3_MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


class Special(str):
    """A piece of prompt text that is one special token of the template."""


class TokenIds(tuple):
    """Text already in token form: a reply as the model generated it, so the prompt (and the KV cache)
    hold the model's own tokens even where re-tokenizing its text would split it differently."""


def _content(m: dict, reply_ids: dict | None):
    """A message's content, or its generated ids when this exact reply text is known."""
    content = m["content"]
    if reply_ids and m["role"] == "assistant" and content in reply_ids and content == content.strip():
        return TokenIds(reply_ids[content])
    return content


def format_date(date: _dt.date | str) -> str:
    """'26 Nov 2026', the form the official template's strftime_now("%d %b %Y") gives."""
    return date if isinstance(date, str) else date.strftime("%d %b %Y")


def _check_messages(messages: Sequence[dict]) -> None:
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: role must be system, user or assistant, not {role!r}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, not {type(content).__name__}")


def llama3_parts(messages: Sequence[dict], *, date, add_generation_prompt: bool = True,
                 reply_ids: dict | None = None) -> list:
    """The Llama 3.2 Instruct prompt as a list of text pieces and `Special` tokens."""
    _check_messages(messages)
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    header = f"\n\nCutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {format_date(date)}\n\n"
    parts = [Special("<|begin_of_text|>"), *_turn("system", header + system)]
    for m in messages:
        content = _content(m, reply_ids)
        if isinstance(content, TokenIds):
            parts += [Special("<|start_header_id|>"), m["role"], Special("<|end_header_id|>"), "\n\n", content,
                      Special("<|eot_id|>")]
        else:
            parts += _turn(m["role"], "\n\n" + content.strip())
    if add_generation_prompt:
        parts += [Special("<|start_header_id|>"), "assistant", Special("<|end_header_id|>"), "\n\n"]
    return parts


def _turn(role: str, body: str) -> list[str]:
    return [Special("<|start_header_id|>"), role, Special("<|end_header_id|>"), body, Special("<|eot_id|>")]


def render_chat(messages: Sequence[dict], *, date, add_generation_prompt: bool = True) -> str:
    """The conversation exactly as the official Llama 3.2 Instruct chat template renders it."""
    return "".join(llama3_parts(messages, date=date, add_generation_prompt=add_generation_prompt))


def is_llama3_tokenizer(tokenizer) -> bool:
    ids = tokenizer.convert_tokens_to_ids(list(LLAMA3_MARKERS))  # get_vocab() would copy 128k entries
    return all(i is not None and i != tokenizer.unk_token_id for i in ids)


def encode_parts(tokenizer, parts: Iterable) -> list[int]:
    """Ids for a prompt: `Special` parts map to their one id, `TokenIds` are used as they are, runs of
    text never produce a special id.

    Adjacent text pieces are joined before tokenizing, so the ids equal those of tokenizing the whole
    rendered string whenever the text holds no special-token text.
    """
    ids: list[int] = []
    run: list[str] = []

    def flush():
        if run:
            text = "".join(run)
            ids.extend(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
            run.clear()

    for part in parts:
        if isinstance(part, TokenIds):
            flush()
            ids.extend(part)
        elif isinstance(part, Special):
            flush()
            token_id = tokenizer.convert_tokens_to_ids(str(part))
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no special token {part!r}")
            ids.append(token_id)
        else:
            run.append(part)
    flush()
    return ids


def encode_chat(tokenizer, messages: Sequence[dict], *, date, add_generation_prompt: bool = True,
                reply_ids: dict | None = None) -> list[int]:
    """Prompt ids for a chat: Llama 3 format when the tokenizer is Llama 3's, else the tokenizer's own
    chat template (SmolLM2's ChatML, for one), with the same guarantee for message text.

    `reply_ids` maps reply texts the model generated to its own ids for them (see `TokenIds`).
    """
    if is_llama3_tokenizer(tokenizer):
        parts = llama3_parts(messages, date=date, add_generation_prompt=add_generation_prompt, reply_ids=reply_ids)
    else:
        parts = template_parts(tokenizer, messages, add_generation_prompt=add_generation_prompt, reply_ids=reply_ids)
    return encode_parts(tokenizer, parts)


def _sentinel(i: int) -> str:
    return f"\ue000{i}\ue001"


def template_parts(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                   reply_ids: dict | None = None) -> list:
    """Render the tokenizer's own chat template with placeholders, then split it into special tokens
    (found only in the template's own text) and text (template text joined with message contents)."""
    _check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer is not Llama 3's and has no chat template of its own")
    stand_ins = [{"role": m["role"], "content": _sentinel(i)} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(stand_ins, tokenize=False, add_generation_prompt=add_generation_prompt)
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.content}, key=len, reverse=True)
    special_re = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
    parts: list[str] = []
    for piece in re.split("(\ue000\\d+\ue001)", rendered):
        match = re.fullmatch("\ue000(\\d+)\ue001", piece)
        if match:
            parts.append(_content(messages[int(match.group(1))], reply_ids))
            continue
        pos = 0
        for m in special_re.finditer(piece) if special_re else ():
            parts += [piece[pos : m.start()], Special(m.group())]
            pos = m.end()
        parts.append(piece[pos:])
    return [p for p in parts if p]
