"""The chat model in a process of its own (model.isolated): the same replies as in this process, across turns,
stops and cache drops; load errors and a crashed child reach the caller as clear errors."""

import os
import signal
import threading

import pytest

from model.errors import ModelError
from model.isolated import RunnerProcess, log_path
from model.runner import Runner
from model.sampling import Sampling

GREEDY = Sampling(temperature=0.0, max_new_tokens=24)
TURN1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about bread."}]


def reply(backend, messages, **kw):
    return "".join(backend.stream(messages, sampling=kw.pop("sampling", GREEDY), **kw)), backend.last_stats


@pytest.mark.slow
def test_a_runner_in_its_own_process_answers_as_it_does_here(tiny_llama_dir):
    heard = []
    child = RunnerProcess.load(tiny_llama_dir, quantize="int8", progress=heard.append)  # quantizes: a first start
    try:
        assert any("int8" in h for h in heard), heard  # the child's load messages reach the caller
        here = Runner.load(tiny_llama_dir, quantize="int8")  # the weights the child quantized, from the cache
        assert (child.name, child.quantize, child.context_window, child.eos_ids) == \
               (here.name, here.quantize, here.context_window, here.eos_ids)

        (a1, s1), (b1, t1) = reply(child, TURN1), reply(here, TURN1)
        assert a1 == b1 and child.last_reply_ids == here.last_reply_ids and s1.new_tokens == t1.new_tokens
        turn2 = TURN1 + [{"role": "assistant", "content": a1}, {"role": "user", "content": "And butter?"}]
        (a2, s2), (b2, t2) = reply(child, turn2), reply(here, turn2)
        assert a2 == b2 and s2.cached_tokens == t2.cached_tokens > 0 and s2.prefill_tok_s > 0  # the KV cache held

        # Stopped after three pieces: the next reply is whole and the same as here (what the child had
        # written after the stop is read and dropped first).
        cancel, pieces = threading.Event(), []
        for piece in child.stream(TURN1, sampling=Sampling(temperature=0.0, max_new_tokens=200), cancel=cancel):
            pieces.append(piece)
            if len(pieces) == 3:
                cancel.set()
        assert len(pieces) == 3 and child.last_stats.stop_reason == "cancelled"
        assert reply(child, turn2)[0] == b2

        cancel.clear()
        cancel.set()  # set before the first token: nothing is shown
        assert reply(child, TURN1, cancel=cancel)[0] == "" and child.last_stats.stop_reason == "cancelled"

        child.clear_cache()
        again, stats = reply(child, turn2)
        assert again == b2 and stats.cached_tokens == 0

        # A child that dies mid-reply: that reply fails with an error that says what happened and where its
        # output went; the next one starts a fresh child, whose answer is the same.
        pieces = child.stream(TURN1, sampling=Sampling(temperature=0.0, max_new_tokens=1000))
        next(pieces)
        os.kill(child._process.pid, signal.SIGKILL)
        with pytest.raises(ModelError, match=r"process stopped \(exit code -9\)") as e:
            for _ in pieces:
                pass
        assert str(log_path()) in e.value.message and "next message starts it again" in e.value.message
        assert reply(child, turn2)[0] == b2 and child.last_stats.cached_tokens == 0
        # One that died between replies is started again without an error.
        os.kill(child._process.pid, signal.SIGKILL)
        child._process.wait()
        assert reply(child, turn2)[0] == b2
        assert log_path().read_text().count("--- ") == 3  # each child's account is kept
    finally:
        child.close()
    assert child._process.poll() is not None


def test_load_errors_reach_the_caller(tmp_path):
    with pytest.raises(ModelError, match="not found"):  # a wrong name fails at once, before any process starts
        RunnerProcess.start(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ModelError, match="Could not load the checkpoint") as e:
        RunnerProcess.load(tmp_path)
    assert e.value.title == "Model load failed"
    assert "Traceback" in log_path().read_text()  # the child's own account, for a bug report
