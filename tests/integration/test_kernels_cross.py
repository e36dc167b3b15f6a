"""Kernel variants this machine cannot run natively: the NEON build (aarch64 with the dot-product
extension), cross-compiled and run under qemu-user, against the same PyTorch references as the native
variants (tests/unit/test_qkernel.py, tests/integration/test_step.py). qemu checks results, not speed."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from model.kvcache import PrefixCache
from model.quant import QLinear, quantize_model
from model.step import LlamaStep
from tests.helpers.kernels import (as_tensor, build_driver, decode_job, int8_activations, qlinear_job,
                                   run_jobs)

VARIANTS = ["neon"]


@pytest.fixture(scope="module", params=VARIANTS)
def driver(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"driver-{request.param}")
    try:
        exe, prefix = build_driver(request.param, folder)
    except LookupError as e:
        if os.environ.get("CI"):  # .ci/run installs both: there, a missing tool is a failure
            pytest.fail(str(e))
        pytest.skip(str(e))
    return exe, prefix, folder


CASES = [(bits, group, n, k, rows) for bits, group in [(4, 32), (4, 64), (4, 128), (8, None)]
         for n, k in [(48, 128), (40, 96), (300, 512)] if not group or k % group == 0 for rows in (1, 3, 9)]


def test_matmul_matches_the_reference(driver):
    exe, prefix, folder = driver
    jobs, want = [], []
    for i, (bits, group, n, k, rows) in enumerate(CASES):
        torch.manual_seed(i)
        q = QLinear.from_linear(nn.Linear(k, n, bias=False), bits, group or k)
        x = torch.randn(rows, k)
        jobs.append(qlinear_job(x, q))
        want.append(int8_activations(x) @ q.dequantized().T)
    x = torch.randn(5, 256)
    q = QLinear.from_linear(nn.Linear(256, 64, bias=False), 4, 32)
    jobs.append(qlinear_job(x.bfloat16(), q))  # bf16 in, bf16 out
    want.append(int8_activations(x.bfloat16()) @ q.dequantized().T)
    got = run_jobs(exe, prefix, jobs, folder)
    assert len(got) == len(want)
    for blob, ref, case in zip(got[:-1], want[:-1], CASES):
        torch.testing.assert_close(as_tensor(blob, torch.float32, ref.shape), ref, rtol=1e-4, atol=1e-4, msg=str(case))
    torch.testing.assert_close(as_tensor(got[-1], torch.bfloat16, want[-1].shape).float(), want[-1], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_decode_step_matches_the_lean_step(driver, tiny_llama_dir, dtype, mode):
    from transformers import AutoModelForCausalLM

    exe, prefix, folder = driver
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).eval()
    quantize_model(model, mode, "native")  # packing needs no kernel
    kv = PrefixCache(model)
    kv.eager_step = None
    token, ids = 4242, list(range(1000, 1037))
    with torch.inference_mode():
        kv.forward(ids)
        n = len(ids)
        like = torch.empty(1, model.config.num_key_value_heads, 0, model.model.layers[0].self_attn.head_dim, dtype=dtype)
        buffers = [layer.reserve(n + 1, like) for layer in kv.cache.layers]
        h = model.model.embed_tokens(torch.tensor([[token]]))
        cos, sin = model.model.rotary_emb(h, position_ids=torch.tensor([[n]]))
        job = decode_job(model, buffers, n, h, cos, sin)  # the cache as it is before the step
        want = LlamaStep(model)(torch.tensor([[token]]), kv.cache).float()
        got = run_jobs(exe, prefix, [job], folder)
        out = as_tensor(got[0], dtype, h.shape)
        logits = model.lm_head(model.model.norm(out))[0, -1].float()
    rel = float((logits - want).norm() / want.norm())
    assert rel < (0.02 if dtype == torch.bfloat16 else 1e-4), rel
    assert int(logits.argmax()) == int(want.argmax())
    for i, layer in enumerate(kv.cache.layers):  # the step's key and value went into the cache
        keys = as_tensor(got[1 + 2 * i], dtype, buffers[i][0].shape)
        torch.testing.assert_close(keys[:, :, n].float(), layer.keys[:, :, n].float(), atol=0.05, rtol=0.05)
        torch.testing.assert_close(keys[:, :, :n].float(), layer.keys[:, :, :n].float(), atol=0, rtol=0)
