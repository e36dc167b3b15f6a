"""Eager decode steps (model.step): the lean step gives transformers' logits bit for bit; the native one
(every decoder layer in one kernel call) tracks them, writes the same KV cache, and survives the cache
growing under it."""

from __future__ import annotations

import pytest
import torch

from model.kvcache import PrefixCache
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["int8", "int4", "int4-fast"])
def test_native_step_tracks_the_lean_step_as_the_cache_grows(tiny_llama_dir, monkeypatch, mode, dtype,
                                                             kernel_variant):
    import model.growing

    monkeypatch.setattr(model.growing, "GROW", 3)  # buffers move under the native step every few tokens
    m = tiny(tiny_llama_dir, dtype, mode)
    assert isinstance(eager_step(m), NativeStep)
    ids, steps = list(range(1000, 1030)), [int(t) for t in torch.randint(1000, 120000, (40,), generator=torch.Generator().manual_seed(0))]
    want, lean = run(m, LlamaStep(m), ids, steps)
    got, native = run(m, NativeStep(m), ids, steps)
    assert torch.equal(got[0], want[0])  # the prompt: transformers' forward both times
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
    # the same arithmetic: bf16 rounds alike at every step (fp32 attention and SiLU), fp32 differs only in
    # the order of sums
    assert rel.max() < (0.02 if dtype == torch.bfloat16 else 1e-4), rel
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


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_runner_decodes_natively_in_bf16_and_fp32(tiny_runner_factory, kernel_variant, dtype):
    from model.sampling import Sampling

    native = tiny_runner_factory(dtype=dtype, quantize="int4")
    lean = tiny_runner_factory(dtype=dtype, quantize="bf16")  # unquantized: the modules' own step
    assert isinstance(native._kv.eager_step, NativeStep) and type(lean._kv.eager_step) is LlamaStep
    msgs = [{"role": "user", "content": "Tell me about rivers."}]
    reply = "".join(native.stream(msgs, sampling=Sampling(temperature=0, max_new_tokens=16)))
    assert reply and native.last_stats.new_tokens > 1


def test_native_step_reads_rotary_rows_from_a_table_that_equals_the_module_position_by_position(
        tiny_llama_dir, monkeypatch):
    """The cos/sin table (no PyTorch op per step for them) gives the logits of calling the rotary module at
    each position, bit for bit, also once the positions outgrow the table's first size."""
    import model.step

    m = tiny(tiny_llama_dir, torch.float32, "int4")
    assert m.model.rotary_emb.rope_type in model.step.STATIC_ROPE
    ids = list(range(1000, 1020))
    steps = [int(t) for t in torch.randint(1000, 120000, (30,), generator=torch.Generator().manual_seed(1))]
    monkeypatch.setattr(model.step, "ROPE_TABLE", 8)  # made at the first step (20), outgrown at 42
    step = NativeStep(m)
    got, _ = run(m, step, ids, steps)
    assert step._table is not None and step._table[0].shape[1] == 2 * (2 * (len(ids) + 1) + 1)
    step._table = None
    monkeypatch.setattr(model.step, "STATIC_ROPE", ())  # one position at a time, as the module computes it
    want, _ = run(m, step, ids, steps)
    assert torch.equal(got, want)
