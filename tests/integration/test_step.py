"""Eager decode steps (model.step): the lean step gives transformers' logits bit for bit; the native one
(every decoder layer in one kernel call) tracks them, writes the same KV cache, and survives the cache
growing under it."""

from __future__ import annotations

import pytest
import torch

from model.kvcache import PrefixCache
from model.qkernel import available
from model.quant import quantize_model
from model.step import LlamaStep, NativeStep, eager_step


def tiny(folder, dtype, mode=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    if mode:
        quantize_model(model, mode)
    return model


def run(model, step, ids, steps):
    """Prefill `ids`, then feed `steps` one at a time through `step` (None: transformers' forward)."""
    kv = PrefixCache(model)
    kv.eager_step = step
    with torch.inference_mode():
        out = [kv.forward(ids)] + [kv.forward([t]) for t in steps]
    return torch.stack([x.float() for x in out]), kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_step_gives_the_forward_logits_exactly(tiny_llama_dir, dtype):
    model = tiny(tiny_llama_dir, dtype)
    assert LlamaStep.supports(model) and not NativeStep.supports(model)  # no QLinear layers
    ids, steps = list(range(1000, 1040)), list(range(2000, 2012))
    want, _ = run(model, None, ids, steps)
    got, kv = run(model, LlamaStep(model), ids, steps)
    assert torch.equal(got, want)
    assert kv.cache.get_seq_length() == len(ids) + len(steps)


def test_models_with_swapped_layers_keep_transformers_forward(tiny_llama_dir):
    from guard.fastpath import optimise_for_checks

    model = tiny(tiny_llama_dir, torch.float32)
    assert optimise_for_checks(model)  # the guard's fused MLPs and last-position layer
    assert eager_step(model) is None


@pytest.mark.skipif(available() is not None, reason=f"the VNNI kernel does not run here: {available()}")
@pytest.mark.parametrize("mode", ["int8", "int4", "int4-fast"])
def test_native_step_tracks_the_lean_step_as_the_cache_grows(tiny_llama_dir, monkeypatch, mode):
    import model.kvcache

    monkeypatch.setattr(model.kvcache, "GROW", 3)  # buffers move under the native step every few tokens
    m = tiny(tiny_llama_dir, torch.bfloat16, mode)
    assert isinstance(eager_step(m), NativeStep)
    ids, steps = list(range(1000, 1030)), [int(t) for t in torch.randint(1000, 120000, (40,), generator=torch.Generator().manual_seed(0))]
    want, lean = run(m, LlamaStep(m), ids, steps)
    got, native = run(m, NativeStep(m), ids, steps)
    assert torch.equal(got[0], want[0])  # the prompt: transformers' forward both times
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert rel.max() < 0.02, rel  # bf16 rounding of the same arithmetic; fp32 attention and SiLU
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    n = len(ids) + len(steps)
    for a, b in zip(native.cache.layers, lean.cache.layers):
        assert a.keys.shape[-2] == b.keys.shape[-2] == n
        torch.testing.assert_close(a.keys, b.keys, atol=0.05, rtol=0.05)
        torch.testing.assert_close(a.values, b.values, atol=0.05, rtol=0.05)
    # Cropping (an edited message) and decoding on from there agrees too.
    for kv in (native, lean):
        kv.crop(len(ids) + 5)
    with torch.inference_mode():
        a, b = native.forward([7]), lean.forward([7])
    assert ((a.float() - b.float()).norm() / b.float().norm()) < 0.02


@pytest.mark.skipif(available() is not None, reason=f"the VNNI kernel does not run here: {available()}")
def test_runner_decodes_natively_in_bf16_and_leanly_in_fp32(tiny_runner_factory):
    from model.sampling import Sampling

    native = tiny_runner_factory(dtype="bfloat16", quantize="int4")
    lean = tiny_runner_factory(quantize="int4")  # fp32 activations: the kernel step is bf16 only
    assert isinstance(native._kv.eager_step, NativeStep) and type(lean._kv.eager_step) is LlamaStep
    msgs = [{"role": "user", "content": "Tell me about rivers."}]
    reply = "".join(native.stream(msgs, sampling=Sampling(temperature=0, max_new_tokens=16)))
    assert reply and native.last_stats.new_tokens > 1
