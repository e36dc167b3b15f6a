"""The GPU path: the runner and the guard on CUDA in bf16, as `--device auto` picks them on a GPU machine.
Skipped where there is no CUDA device (CI); run on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_guard import KEYWORD
from tests.integration.test_guard import SAFE_REPLY, UNSAFE_REPLY, deltas_of, released, run, user
from tests.integration.test_runner import DATE, chat, reply

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_runner_on_cuda_matches_generate_and_reuses_its_cache(tiny_llama_dir):
    from model.runner import Runner
    from model.sampling import Sampling

    r = Runner.load(str(tiny_llama_dir), device="auto")
    assert r.device == "cuda" and r.dtype == torch.bfloat16 and r.model.device.type == "cuda"
    greedy = Sampling(temperature=0, max_new_tokens=16)
    msgs = chat("Tell me a story.")
    ids = r.fit(msgs, date=DATE, max_new_tokens=16)[0]
    first = reply(r, msgs, greedy)
    with torch.inference_mode():
        out = r.model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=len(r.last_reply_ids),
                               min_new_tokens=len(r.last_reply_ids), do_sample=False, pad_token_id=0)
    assert out[0, len(ids):].tolist() == r.last_reply_ids
    first_prompt = r.last_stats.prompt_tokens
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "Another, please."}]
    second, second_ids = reply(r, msgs, greedy), r.last_reply_ids
    assert r.last_stats.cached_tokens >= first_prompt
    assert r._kv.cache.layers[0].keys.device.type == "cuda"
    r.clear_cache()
    assert reply(r, msgs, greedy) == second and r.last_reply_ids == second_ids


def test_guard_on_cuda_screens_messages_and_streams(tiny_guard_dir, llama_tokenizer):
    from guard.classifier import Guard
    from guard.stream import Block, StreamModerator

    g = Guard.load(str(tiny_guard_dir), device="auto")
    assert g.model.device.type == "cuda" and g.model.dtype == torch.bfloat16
    assert g.check([user("Tell me about cooking bread.")]).safe
    bad = g.check([user(f"Where can I buy a {KEYWORD}?")])
    assert not bad.safe and bad.categories == ("S1",)
    m = StreamModerator(g, [user("Tell me a story.")], mode="strict", check_every=8, min_sentence_tokens=4)
    assert released(run(m, deltas_of(llama_tokenizer, SAFE_REPLY))) == SAFE_REPLY
    m = StreamModerator(g, [user("Tell me a story.")], mode="strict", check_every=8, min_sentence_tokens=4)
    events = run(m, deltas_of(llama_tokenizer, UNSAFE_REPLY))
    assert isinstance(events[-1], Block) and events[-1].verdict.categories == ("S1",)
