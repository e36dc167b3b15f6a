"""Weight-only int8/int4 on a tiny Llama with the real config shape, and the quantize-once cache."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from model import qcache

from model.loading import resolve_source
from model.qkernel import available
from model.quant import SHORTLIST, Int4Linear, Int8Linear, QLinear, ShortlistHead, kernel, plan, quantize_model
from model.runner import Runner
from model.sampling import Sampling


def logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def ids(llama_tokenizer):
    return llama_tokenizer("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"]


@pytest.mark.parametrize("kernel_name", ["native", "torch"])
@pytest.mark.parametrize("mode, tolerance", [("int8", 0.03), ("int4", 0.12), ("int4-fast", 0.2)])
def test_quantized_layers_track_the_original(tiny_llama_dir, ids, mode, tolerance, kernel_name):
    from transformers import AutoModelForCausalLM

    if kernel_name == "native" and (why := available()):
        pytest.skip(why)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    q = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    layout = quantize_model(q, mode, kernel_name)
    head, down = q.get_output_embeddings(), q.model.layers[0].mlp.down_proj
    if kernel_name == "native":
        assert isinstance(down, QLinear) and down.bits == (8 if mode == "int8" else 4) and not down.float_out
        if mode == "int4":  # int4 logits, the shortlist's from int8 weights
            assert isinstance(head, ShortlistHead) and head.coarse.bits == 4 and head.coarse.float_out
        else:
            assert isinstance(head, QLinear) and head.bits == (8 if mode == "int8" else 4)
            assert head.float_out  # logits in fp32
    else:
        assert isinstance(head, Int8Linear if mode in ("int8", "int4") else Int4Linear)
        assert isinstance(down, Int8Linear if mode == "int8" else Int4Linear)
    if mode == "int4":
        assert layout["model.layers.0.self_attn.q_proj"] == ("int4", 32)
    a, b = logits(ref, ids), logits(q, ids)
    rel = (a - b).norm() / a.norm()
    assert rel < tolerance, rel
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.7


def test_the_shortlist_head_rescores_its_best_int4_logits_from_int8_weights(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    if why := available():
        pytest.skip(why)
    linear = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).lm_head
    head = ShortlistHead.from_linear(linear, 64)
    blocks = linear.weight.reshape(len(linear.weight), -1, 32).abs().amax(-1, keepdim=True)  # int8 per 32 inputs
    error = (head.dequantized() - linear.weight).reshape(blocks.shape[0], -1, 32).abs()
    assert (error <= blocks / 254 * 1.01).all()
    torch.manual_seed(0)
    x = torch.randn(3, 2, linear.in_features)
    with torch.inference_mode():
        out, coarse = head(x), head.coarse(x)
        int8 = x @ head.dequantized().T  # int8 weights, activations as they are
        exact = linear(x)
    top = coarse.topk(SHORTLIST, dim=-1).indices
    shortlisted = torch.zeros_like(out, dtype=torch.bool).scatter_(-1, top, True)
    torch.testing.assert_close(out[shortlisted], int8[shortlisted])
    assert torch.equal(out[~shortlisted], coarse[~shortlisted])  # the rest: the int4 logits
    assert (out.argmax(-1) == int8.argmax(-1)).all()  # the best int8 logit is on the shortlist
    assert (out - exact)[shortlisted].abs().max() < (coarse - exact)[shortlisted].abs().max() / 4
    # the guard's category rows (model.kvcache, rows=...) come from the int8 weights
    torch.testing.assert_close(head.dequantized([5, 7]), head.dequantized()[[5, 7]])


def test_plan_rejects_unknown_modes(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="quantize must be one of"):
        plan(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), "int3")


def test_cache_build_reuse_and_rebuild_after_corruption(tiny_llama_dir, tmp_path, ids):
    cache, said = tmp_path / "q", []
    first = Runner.load(str(tiny_llama_dir), device="cpu", dtype="bfloat16", quantize="auto", cache_folder=cache,
                        progress=said.append)
    assert (first.quantize, first.model.quant_cache) == ("int4", "built")  # auto: int4 on the CPU
    # a first start says what it does and how far along it is (the layer count at most once a second)
    assert said[0].startswith("Reading") and "to int4 (first start only" in said[0]
    assert re.fullmatch(r"Quantizing \S+ to int4: 0/\d+ layers \(first start only\)…", said[1]), said
    [weights] = cache.glob("*.bin")
    second = Runner.load(str(tiny_llama_dir), device="cpu", dtype="bfloat16", quantize="int4", cache_folder=cache,
                         progress=said.append)
    assert second.model.quant_cache == "hit" and len(said) == 2
    if kernel() == "native":  # every weight in one buffer, on 2 MB page boundaries (huge pages where allowed)
        bases = {m.packed.untyped_storage().data_ptr() for m in second.model.modules() if isinstance(m, QLinear)}
        assert len(bases) == 1
        assert second.model.model.layers[0].mlp.up_proj.packed.data_ptr() % 64 == 0
    torch.testing.assert_close(logits(first.model, ids), logits(second.model, ids))
    s = Sampling(temperature=0, max_new_tokens=8)
    msgs = [{"role": "user", "content": "Hello"}]
    assert "".join(first.stream(msgs, sampling=s)) == "".join(second.stream(msgs, sampling=s))

    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte deep inside a tensor
    weights.write_bytes(bytes(data))
    third = Runner.load(str(tiny_llama_dir), device="cpu", dtype="bfloat16", quantize="int4", cache_folder=cache)
    assert third.model.quant_cache == "built"
    torch.testing.assert_close(logits(third.model, ids), logits(first.model, ids))

    weights.write_bytes(b"not a checkpoint")  # truncated / replaced
    (next(cache.glob("*.json"))).write_text("{")
    assert Runner.load(str(tiny_llama_dir), device="cpu", dtype="bfloat16", quantize="int4",
                       cache_folder=cache).model.quant_cache == "built"


def test_a_warm_start_reads_the_entry_before_torch_is_imported_and_only_once(tiny_llama_dir, tmp_path, monkeypatch):
    cache = tmp_path / "q"
    Runner.load(str(tiny_llama_dir), device="cpu", dtype="bfloat16", quantize="int4", cache_folder=cache)
    [weights], [record] = cache.glob("*.bin"), cache.glob("*.json")
    arena_bytes = json.loads(record.read_text())["arena_bytes"]
    code = ("import sys; from model.loading import resolve_source; from model.qcache import prefetch\n"
            f"p = prefetch(resolve_source({str(tiny_llama_dir)!r}), 'auto', {str(cache)!r})\n"
            "view = p.result.result(timeout=120)\n"
            "print(p.weights.name, len(view), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=False)
    assert out.stdout.split() == [weights.name, str(arena_bytes), "False"], out.stderr  # read and verified, no torch

    reads, ahead = [], []
    real_read, real_prefetch = qcache._read_verified, qcache.prefetch
    monkeypatch.setattr(qcache, "_read_verified", lambda *a: reads.append(a[0]) or real_read(*a))
    monkeypatch.setattr(qcache, "prefetch", lambda *a: ahead.append(real_prefetch(*a)) or ahead[-1])
    warm = Runner.load(str(tiny_llama_dir), device="cpu", dtype="bfloat16", quantize="auto", cache_folder=cache)
    assert warm.model.quant_cache == "hit" and ahead[0].weights == weights
    assert reads == [weights]  # the load used the prefetched read: no second one
    assert qcache.prefetch(resolve_source(tiny_llama_dir), "int8", cache) is None  # no such entry yet

    meta = json.loads(record.read_text())
    wrong = qcache.Prefetch(weights, {**meta, "crc32": [[1], [2]]})  # another record's read: cancelled, not used
    model, _ = qcache.load_quantized(resolve_source(tiny_llama_dir), "int4", dtype=torch.bfloat16, cache_folder=cache,
                                     build=None, prefetched=wrong)
    assert model.quant_cache == "hit" and wrong.cancelled.is_set() and wrong.result.result() is None
    stop = qcache.threading.Event()
    stop.set()
    assert qcache._read_verified(weights, meta, stop) is None  # a cancelled read gives nothing


def test_a_new_entry_replaces_the_stale_ones(tiny_llama_dir, tmp_path):
    copy, cache = tmp_path / "copy", tmp_path / "q"
    shutil.copytree(tiny_llama_dir, copy)

    def entries():
        return {json.loads(r.read_text())["mode"]: r.stem for r in cache.glob("*.json")}

    for mode in ("int4", "int8"):
        Runner.load(str(copy), device="cpu", dtype="bfloat16", quantize=mode, cache_folder=cache)
    before = entries()
    old = cache / ("0" * 32)
    old.with_suffix(".json").write_text(json.dumps({"format": 3, "key": "0" * 32, "mode": "int4"}))
    old.with_suffix(".bin").write_bytes(b"an entry of an older release")
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")  # the checkpoint changed
    Runner.load(str(copy), device="cpu", dtype="bfloat16", quantize="int4", cache_folder=cache)
    after = entries()
    assert after["int8"] == before["int8"] and after["int4"] != before["int4"]  # only what it replaces goes
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{k}{s}" for k in after.values() for s in (".bin", ".json"))


def test_weights_buffer_is_aligned_for_huge_pages_and_writable():
    view = qcache._hugepage_view(3 << 20)
    t = torch.frombuffer(view, dtype=torch.uint8)
    assert t.numel() == 3 << 20 and t.data_ptr() % (2 << 20) == 0 and int(t.sum()) == 0
    t.fill_(7)
    assert int(t.sum()) == 7 * (3 << 20)


def test_each_mode_has_its_own_entry_and_a_changed_checkpoint_is_not_reused(tiny_llama_dir, tmp_path):
    from model.qcache import cache_key

    src = resolve_source(tiny_llama_dir)
    assert len({cache_key(src, m, torch.bfloat16) for m in ("int8", "int4", "int4-fast")}) == 3
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    before = cache_key(resolve_source(copy), "int4", torch.bfloat16)
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert cache_key(resolve_source(copy), "int4", torch.bfloat16) != before


def test_auto_is_int4_on_the_cpu_where_a_fast_kernel_runs_it(monkeypatch):
    import model.quant
    from model.device import pick_quantize

    monkeypatch.setattr(model.quant, "kernel", lambda: "native")
    assert pick_quantize("auto", "cpu", torch.bfloat16) == "int4"
    assert pick_quantize("auto", "cpu", torch.float32) == "int4"  # the native kernels take fp32 activations too
    assert pick_quantize("auto", "cuda:0", torch.bfloat16) == "bf16"  # the modes are CPU kernels
    assert pick_quantize("auto", "cpu", torch.float16) == "bf16"  # for bf16 or fp32 activations
    assert pick_quantize("int8", "cpu", torch.bfloat16) == "int8"  # what was asked for, as asked
    monkeypatch.setattr(model.quant, "kernel", lambda: "torch")  # no native kernel: PyTorch's int4 kernel
    assert pick_quantize("auto", "cpu", torch.bfloat16) == "int4"
    assert pick_quantize("auto", "cpu", torch.float32) == "bf16"  # it is slow with fp32 activations


def test_an_explicit_mode_that_would_be_slow_loads_unquantized_and_says_why(monkeypatch, tiny_llama_dir):
    import model.quant
    from model.device import quantize_note

    monkeypatch.setattr(model.quant, "kernel", lambda: "native")
    assert quantize_note("int4", "cpu", torch.float32) == ("int4", "")
    monkeypatch.setattr(model.quant, "kernel", lambda: "torch")
    assert quantize_note("int4", "cpu", torch.bfloat16) == ("int4", "")  # PyTorch's kernel is fast in bf16
    mode, note = quantize_note("int8", "cpu", torch.float32)
    assert mode == "bf16" and "--quantize int8 needs the native int8/int4 kernel" in note and "slower" in note
    said = []
    runner = Runner.load(str(tiny_llama_dir), device="cpu", dtype="float32", quantize="int4", progress=said.append)
    assert runner.quantize == "bf16" and runner.quantize_note in said and "--quantize int4" in runner.quantize_note
    assert not any(isinstance(m, (QLinear, Int4Linear, Int8Linear)) for m in runner.model.modules())


def test_quantized_modes_refuse_other_devices(tiny_llama_dir):
    from model.errors import ModelError
    from model.loading import load_checkpoint

    with pytest.raises(ModelError, match="for CPU decoding"):
        load_checkpoint(resolve_source(tiny_llama_dir), device="cuda", dtype=torch.bfloat16, quantize="int4")


def test_pytorch_kernels_on_request_and_why():
    import os
    import subprocess
    import sys

    code = "from model.quant import kernel; from model.qkernel import available; print(kernel(), available())"
    env = {**os.environ, "LLAMA_CHAT_KERNEL": "torch"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert out.stdout.strip() == "torch LLAMA_CHAT_KERNEL=torch asks for PyTorch's kernels", out.stderr


def test_a_fused_layer_of_a_cached_model_is_a_view_of_its_weights(tiny_llama_dir, tmp_path):
    """The guard fuses each MLP's gate and up projections (guard.fastpath): read from the cache, the two
    lie back to back, so the fused layer adds no memory; elsewhere it is a copy. Both compute the same."""
    from model.loading import load_model

    if why := available():
        pytest.skip(why)
    src = resolve_source(tiny_llama_dir)
    model, _ = qcache.load_quantized(src, "int8", dtype=torch.float32, cache_folder=tmp_path,
                                     build=lambda: load_model(src, torch.float32))
    mlp = model.model.layers[0].mlp
    gate, up = mlp.gate_proj, mlp.up_proj
    x = torch.randn(3, gate.in_features)
    fused, swapped = QLinear.concat([gate, up]), QLinear.concat([up, gate])
    assert fused.packed.untyped_storage().data_ptr() == gate.packed.untyped_storage().data_ptr()
    assert fused.packed.data_ptr() == gate.packed.data_ptr()
    assert fused.packed.shape == (2 * len(gate.packed), gate.packed.shape[1])
    assert swapped.packed.untyped_storage().data_ptr() != gate.packed.untyped_storage().data_ptr()  # not in order: copied
    with torch.inference_mode():
        assert torch.equal(fused(x), torch.cat([gate(x), up(x)], dim=-1))
        assert torch.equal(swapped(x), torch.cat([up(x), gate(x)], dim=-1))
