"""Compiled decode steps: a reply switches between eager and compiled steps without changing its
greedy output, and the compiled code is kept in the cache folder."""

from __future__ import annotations

import pytest
import torch

from model.compiled import CompiledDecoder, bucket_for, can_compile
from model.sampling import Sampling

pytestmark = pytest.mark.slow


def test_buckets_follow_the_context():
    assert [bucket_for(n) for n in (1, 512, 513, 1100, 2000, 8192)] == [512, 512, 1024, 1536, 2048, 8192]


@pytest.mark.skipif(can_compile() is not None, reason="torch.compile needs a C++ compiler")
@pytest.mark.parametrize("quantize", ["bf16", "int4"])
def test_replies_switch_between_eager_and_compiled_steps_with_the_same_greedy_output(
        tiny_runner_factory, tmp_path, monkeypatch, quantize):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    eager = tiny_runner_factory(context_window=768, quantize=quantize)
    runner = tiny_runner_factory(context_window=768, quantize=quantize)
    # Compiled buckets up to 512 positions only, so a longer reply must carry on eagerly.
    runner.compiled = CompiledDecoder(runner.model, max_positions=512, cache_folder=tmp_path / "inductor", start=False)
    s = Sampling(temperature=0, max_new_tokens=24)

    def both(messages, sampling=s):
        a, b = "".join(eager.stream(messages, sampling=sampling)), "".join(runner.stream(messages, sampling=sampling))
        assert b == a
        # Tiny random models lean on the last token, so compare what the caches hold as well.
        n = len(eager._kv.ids)
        assert runner._kv.ids == eager._kv.ids
        for mine, theirs in zip(runner._kv.cache.layers, eager._kv.cache.layers):
            torch.testing.assert_close(mine.keys[:, :, :n], theirs.keys[:, :, :n], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(mine.values[:, :, :n], theirs.values[:, :, :n], atol=1e-4, rtol=1e-4)
        return b, runner.last_stats

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about rivers."}]
    reply, stats = both(msgs)
    assert stats.compiled_steps == 0  # nothing compiled yet: eager steps on the dynamic cache

    runner.compiled.start()
    assert runner.compiled.wait(1, timeout=600), runner.compiled.error
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And lakes?"}]
    reply, stats = both(msgs)
    assert stats.cached_tokens > 0  # the conversation's KV moved into the static cache
    assert stats.compiled_steps == stats.new_tokens - 1

    # A reply that outgrows the 512 bucket carries on eagerly, mid-reply, in a dynamic cache.
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Say more. " * 140}]
    reply, stats = both(msgs, Sampling(temperature=0, max_new_tokens=64))
    assert stats.prompt_tokens < 512 < stats.prompt_tokens + stats.new_tokens
    assert 0 < stats.compiled_steps < stats.new_tokens - 1
    assert any((tmp_path / "inductor").iterdir())  # compiled code persisted for the next start


def test_a_failed_compile_leaves_decoding_eager_and_says_why(tiny_runner_factory, monkeypatch):
    def broken(self, bucket):
        raise RuntimeError("C++ compile failed: cc1plus not found")

    monkeypatch.setattr(CompiledDecoder, "_warm", broken)
    runner = tiny_runner_factory()
    runner.compile_decoding()
    assert not runner.compiled.wait(1, timeout=60)
    assert "cc1plus" in runner.compiled.error
    msgs = [{"role": "user", "content": "Hello"}]
    assert "".join(runner.stream(msgs, sampling=Sampling(temperature=0, max_new_tokens=8)))
    assert runner.last_stats.compiled_steps == 0

    monkeypatch.setattr("model.compiled.can_compile", lambda: "no C++ compiler found")
    assert CompiledDecoder(runner.model, max_positions=512, start=False).error == "no C++ compiler found"
