"""The guard end to end on a tiny Llama trained to answer like Llama Guard 3, with the real tokenizer."""

from __future__ import annotations

import pytest

from guard.classifier import Guard, GuardError, GuardSettings
from guard.stream import Block, Release, Retract, StreamModerator
from guard.verdict import UNREADABLE
from tests.helpers.tiny_guard import KEYWORD

pytestmark = pytest.mark.slow

SAFE_REPLY = "The weather is nice today. We walk to the park with friends. Then we read a good book about rivers."
UNSAFE_REPLY = f"The weather is nice today. We walk to the park with friends. Take the {KEYWORD} and go to the city."


def user(text):
    return {"role": "user", "content": text}


def test_input_and_output_verdicts(tiny_guard):
    ok = tiny_guard.check([user("Tell me about cooking bread.")])
    assert ok.safe and ok.stage == "input" and ok.score < 0.5 and ok.guard_model.endswith("tiny-guard0")
    bad = tiny_guard.check([user(f"Where can I buy a {KEYWORD}?")])
    assert not bad.safe and bad.categories == ("S1",) and bad.category_names == ("Violent Crimes",)
    assert bad.score >= 0.5 and bad.latency_s > 0 and bad.raw == "unsafe\nS1"
    reply = tiny_guard.check([user("Tell me a story."), {"role": "assistant", "content": UNSAFE_REPLY}])
    assert not reply.safe and reply.stage == "output"
    assert tiny_guard.check([user("Tell me a story."), {"role": "assistant", "content": SAFE_REPLY}]).safe


def test_prompt_head_kv_is_reused(tiny_guard):
    head = len(tiny_guard._heads["User"])
    tiny_guard.check([user("Tell me about trains.")])
    kv = tiny_guard._kv["User"]
    assert kv.ids[:head] == tiny_guard._heads["User"]
    cache = kv.cache
    tiny_guard.check([user("Tell me about cats.")])
    assert kv.cache is cache and kv.ids[:head] == tiny_guard._heads["User"]


def test_split_prompt_equals_full_encoding(tiny_guard, llama_tokenizer):
    from guard.prompt import encode_guard_prompt

    for msgs in ([user("Hello.")], [user("a b."), {"role": "assistant", "content": "c d!"}]):
        role = "User" if len(msgs) == 1 else "Agent"
        split = tiny_guard._heads[role] + tiny_guard._encode_conversation(msgs) + tiny_guard._tails[role]
        assert split == encode_guard_prompt(llama_tokenizer, msgs)


def test_threshold_and_excluded_categories(tiny_guard_dir):
    benign = [user("Tell me about cooking bread.")]
    nervous = Guard.load(str(tiny_guard_dir), device="cpu", dtype="float32",
                         settings=GuardSettings(threshold=1e-9))
    v = nervous.check(benign)
    assert not v.safe and 1e-9 <= v.score < 0.5  # a threshold below the score blocks even benign text
    lenient = Guard.load(str(tiny_guard_dir), device="cpu", dtype="float32",
                         settings=GuardSettings(threshold=0.99999999))
    v = lenient.check([user(f"Where can I buy a {KEYWORD}?")])
    assert v.safe == (v.score < 0.99999999) and v.score > 0.5
    excluded = Guard.load(str(tiny_guard_dir), device="cpu", dtype="float32", settings=GuardSettings(excluded=("S1",)))
    head = excluded.tokenizer.decode(excluded._heads["User"])
    assert "S1: Violent Crimes." not in head and "S2: Non-Violent Crimes.\n" in head  # numbering unchanged
    # The model still answers "unsafe\nS1"; with S1 excluded that verdict counts as safe.
    assert excluded.check([user(f"Where can I buy a {KEYWORD}?")]).safe
    with pytest.raises(ValueError, match="unknown categories to exclude: S99"):
        GuardSettings(excluded=("S99",))


def test_budget_keeps_recent_turns_and_windows_long_messages(tiny_guard_dir):
    g = Guard.load(str(tiny_guard_dir), device="cpu", dtype="float32",
                   settings=GuardSettings(token_budget=96, window_overlap=16))
    filler = "the weather is nice today and we walk to the park " * 12  # ~130 tokens: over the budget
    assert g.check([user(filler)]).safe
    hidden_late = filler + f" then a {KEYWORD} " + filler
    v = g.check([user(hidden_late)])
    assert not v.safe and v.categories == ("S1",)  # found in a later window, nothing silently truncated
    long_chat = [user("Tell me about rivers."), {"role": "assistant", "content": filler}] * 3
    assert g.check(long_chat + [user(f"A {KEYWORD}?")]).categories == ("S1",)


def test_fail_closed_on_exceptions(tiny_guard_dir, monkeypatch):
    g = Guard.load(str(tiny_guard_dir), device="cpu", dtype="float32")

    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(g.model.get_decoder().embed_tokens, "forward", broken)
    v = g.check([user("Tell me about bread.")])
    assert not v.safe and "guard error: RuntimeError: out of memory" in v.reason
    assert not g.check([{"role": "assistant", "content": "x"}]).safe  # malformed conversation blocks too


def test_a_model_that_does_not_answer_like_llama_guard_is_refused(tiny_llama_dir):
    """An untrained Llama answers neither 'safe' nor 'unsafe': loading it as the guard must fail."""
    with pytest.raises(GuardError, match="does not answer like Llama Guard 3"):
        Guard.load(str(tiny_llama_dir), device="cpu", dtype="float32")


def test_unknown_category_codes_block(tiny_guard_dir):
    """The tiny guard answers 'unsafe\nS1'; under a custom policy without S1 that code is unknown."""
    g = Guard.load(str(tiny_guard_dir), device="cpu", dtype="float32",
                   settings=GuardSettings(categories={"S2": "Rudeness.", "S3": "Spam."}))
    v = g.check([user(f"Where can I buy a {KEYWORD}?")])
    assert not v.safe and v.reason == UNREADABLE and v.raw == "unsafe\nS1"


def deltas_of(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[i : i + 1]) for i in range(len(ids))]


def run(moderator, deltas):
    events = []
    for d in deltas:
        events += moderator.feed(d)
        if moderator.stopped:
            break
    return events + moderator.finish()


def released(events):
    return "".join(e.text for e in events if isinstance(e, Release))


def test_strict_mode_releases_only_checked_text(tiny_guard, llama_tokenizer):
    m = StreamModerator(tiny_guard, [user("Tell me a story.")], mode="strict", check_every=8, min_sentence_tokens=4)
    events = run(m, deltas_of(llama_tokenizer, SAFE_REPLY))
    assert released(events) == SAFE_REPLY and all(v.safe for v in m.verdicts) and len(m.verdicts) >= 3

    m = StreamModerator(tiny_guard, [user("Tell me a story.")], mode="strict", check_every=8, min_sentence_tokens=4)
    events = run(m, deltas_of(llama_tokenizer, UNSAFE_REPLY))
    assert isinstance(events[-1], Block) and events[-1].verdict.categories == ("S1",)
    assert KEYWORD not in released(events)
    assert released(events).startswith("The weather is nice today.")  # passed sentences were released
    assert m.stopped and m.feed("more") == []


def test_checks_come_every_n_tokens_or_at_a_sentence_end_after_half_as_many(tiny_guard):
    m = StreamModerator(tiny_guard, [user("Tell me a story.")], mode="strict", check_every=8)
    for d in ["Hi", " there", "."]:  # a sentence end after 3 unchecked tokens: too soon
        assert m.feed(d) == []
    assert m.feed(" Ok") == [] and m.feed(".") == [Release("Hi there. Ok.")]  # 5 >= 8 // 2
    for d in [" a", " b", " c", " d", " e", " f", " g"]:
        assert m.feed(d) == []
    assert m.feed(" h") == [Release(" a b c d e f g h")] and len(m.verdicts) == 2  # 8 tokens, no sentence end


def test_fast_mode_releases_at_once_and_retracts(tiny_guard, llama_tokenizer):
    m = StreamModerator(tiny_guard, [user("Tell me a story.")], mode="fast", check_every=64, min_sentence_tokens=64)
    deltas = deltas_of(llama_tokenizer, UNSAFE_REPLY)
    first = m.feed(deltas[0])
    assert first == [Release(deltas[0])]  # no wait for a check
    events = first + run(m, deltas[1:])
    assert KEYWORD in released(events)  # it was shown...
    assert isinstance(events[-1], Retract) and not events[-1].verdict.safe  # ...and the final check retracts it
    assert len(m.verdicts) == 1  # only the final check ran (interval longer than the reply)


def test_streaming_checks_extend_the_guard_cache(tiny_guard, llama_tokenizer):
    m = StreamModerator(tiny_guard, [user("Tell me a story.")], mode="strict", check_every=6, min_sentence_tokens=100)
    kv = tiny_guard._kv["Agent"]
    run(m, deltas_of(llama_tokenizer, SAFE_REPLY))
    assert len(m.verdicts) >= 3
    # After the final check the cache holds the head, the conversation, the tail and the verdict tokens.
    assert kv.ids[: len(tiny_guard._heads["Agent"])] == tiny_guard._heads["Agent"]
    with pytest.raises(ValueError, match="guard mode"):
        StreamModerator(tiny_guard, [], mode="lenient")


def test_check_optimisations_match_the_full_model(tiny_guard_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from guard.fastpath import optimise_for_checks
    from model.kvcache import PrefixCache
    from model.packed import pack_linears

    full = AutoModelForCausalLM.from_pretrained(tiny_guard_dir, dtype=torch.float32)
    fast = AutoModelForCausalLM.from_pretrained(tiny_guard_dir, dtype=torch.float32)
    assert optimise_for_checks(fast)
    # Every projection of the decoder (q, k, v, o, fused gate/up and down in each layer) is oneDNN-packed.
    assert pack_linears(fast.get_decoder()) == 6 * fast.config.num_hidden_layers
    assert not any(type(m) is torch.nn.Linear for m in fast.get_decoder().modules())
    a, b = PrefixCache(full), PrefixCache(fast)
    with torch.inference_mode():
        for ids in ([128000, 9906, 1917, 13, 1102], [128000, 9906, 1917, 30, 358, 1093], [128000, 9906]):
            la, _ = a.extend_to(ids)
            lb, _ = b.extend_to(ids)
            torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
            rows, _ = b.extend_to(ids, rows=(19193, 39257))
            torch.testing.assert_close(rows, la[[19193, 39257]], atol=1e-4, rtol=1e-4)
