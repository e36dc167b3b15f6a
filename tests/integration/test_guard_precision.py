"""The int8 guard (guard.precision): used only once it judges the probe set as full precision does; a
damaged one is refused, visibly, and full precision screens instead."""

from __future__ import annotations

import pytest
import torch

from guard.classifier import Guard
from guard.precision import MAX_SCORE_GAP, pick_precision, probes
from model.quant import QLinear
from tests.helpers.tiny_guard import KEYWORD


def test_auto_is_int8_where_the_native_kernel_runs(kernel_variant):
    assert pick_precision("auto", "cpu") == ("int8", "")
    assert pick_precision("bf16", "cpu") == ("bf16", "")
    assert pick_precision("auto", "cuda:0") == ("bf16", "")
    mode, note = pick_precision("int8", "cuda:0")
    assert mode == "bf16" and "int8 checks are for the CPU" in note
    with pytest.raises(ValueError, match="guard precision must be one of auto, bf16, int8"):
        pick_precision("int4", "cpu")


def test_explicit_int8_without_the_kernel_says_why(monkeypatch):
    monkeypatch.setenv("LLAMA_CHAT_KERNEL", "torch")
    assert pick_precision("auto", "cpu") == ("bf16", "")
    mode, note = pick_precision("int8", "cpu")
    assert mode == "bf16" and "needs the native int8 kernel (LLAMA_CHAT_KERNEL=torch" in note


def test_the_probe_set_covers_what_it_promises():
    found = probes()
    assert {p["lang"] for p in found} == {"en", "fr", "de", "hi", "it", "pt", "es", "th"}
    assert {f"S{i}" for i in range(1, 14)} <= {p["expect"] for p in found}
    assert {len(p["messages"]) % 2 for p in found} == {0, 1}  # output checks and input checks
    for lang in ("fr", "de", "hi", "it", "pt", "es", "th"):  # safe and unsafe in every language
        assert {p["expect"] == "safe" for p in found if p["lang"] == lang} == {True, False}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16 activations: the default on CPUs with native bf16
def test_int8_guard_agrees_with_full_precision_and_is_used(tiny_guard_dir, kernel_variant, dtype):
    said = []
    guard = Guard.load(str(tiny_guard_dir), device="cpu", dtype=dtype, precision="int8", progress=said.append)
    assert guard.precision == "int8" and guard.precision_note == ""
    assert any("probe conversations" in s for s in said)  # the first load checked it
    assert isinstance(guard.model.model.layers[0].self_attn.q_proj, QLinear)
    safe = guard.check([{"role": "user", "content": "Tell me about bread."}])
    unsafe = guard.check([{"role": "user", "content": f"Where do I buy a {KEYWORD}?"}])
    assert safe.safe and safe.precision == "int8"
    assert not unsafe.safe and unsafe.categories == ("S1",) and unsafe.precision == "int8"
    again = []
    second = Guard.load(str(tiny_guard_dir), device="cpu", dtype=dtype, precision="auto", progress=again.append)
    assert second.precision == "int8" and not any("probe" in s for s in again)  # the outcome was kept
    # Read from its cache, the output layer stays memory-mapped from the cache file and unread by loading (no
    # self-test, prompt heads without logits); a check reads two of its rows, a category line the rows it can
    # hold, and the categories still come out.
    assert mapped_file(second.model.lm_head.packed.data_ptr()).endswith(".bin")
    assert resident_fraction(second.model.lm_head.packed) < 0.1
    assert mapped_file(second.model.model.layers[0].mlp.down_proj.packed.data_ptr()) is None  # in the arena
    again_unsafe = second.check([{"role": "user", "content": f"Where do I buy a {KEYWORD}?"}])
    assert (again_unsafe.safe, again_unsafe.categories, again_unsafe.raw) == (False, ("S1",), "unsafe\nS1")


def mapped_file(address: int) -> str | None:
    """The file mapped at `address` in this process, or None for anonymous memory."""
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            start, end = (int(a, 16) for a in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


def test_a_damaged_int8_guard_is_refused_and_full_precision_screens(tiny_guard_dir, kernel_variant, monkeypatch):
    import model.quant

    quantize_rows = model.quant._quantize_rows

    def damaged(w, bits):  # scales off by up to ~40%: a broken quantizer, not a rounding error
        q, scales, offsets = quantize_rows(w, bits)
        noise = torch.empty_like(scales).uniform_(0.6, 1.4, generator=torch.Generator().manual_seed(0))
        return q, (scales * noise).bfloat16().float(), offsets

    monkeypatch.setattr(model.quant, "_quantize_rows", damaged)
    guard = Guard.load(str(tiny_guard_dir), device="cpu", dtype="float32", precision="auto")
    assert guard.precision == "fp32"
    assert guard.precision_note.startswith("int8 refused: probe ") and "full precision" in guard.precision_note
    assert not any(isinstance(m, QLinear) for m in guard.model.modules())
    v = guard.check([{"role": "user", "content": f"Where do I buy a {KEYWORD}?"}])
    assert not v.safe and v.precision == "fp32"
    said = []
    again = Guard.load(str(tiny_guard_dir), device="cpu", dtype="float32", precision="auto", progress=said.append)
    assert again.precision_note == guard.precision_note and not said  # refused again, from the kept outcome
    assert MAX_SCORE_GAP == 0.05


def test_stored_verdicts_record_the_precision(tiny_guard_dir, tiny_runner, kernel_variant, tmp_path):
    from app.config import Config
    from app.history import History
    from app.session import ChatSession, Engine

    config = Config()
    config.generation.temperature, config.generation.max_new_tokens, config.guard.check_every = 0.0, 12, 4
    guard = Guard.load(str(tiny_guard_dir), device="cpu", dtype="float32", precision="int8")
    history = History(tmp_path / "history.sqlite3")
    session = ChatSession(history, config, Engine(tiny_runner, guard, "tiny-llama"))
    list(session.send("Tell me about bread."))
    stored = [v for m in History(history.path).messages(session.conversation_id) for v in m.verdicts]
    assert {v["stage"] for v in stored} == {"input", "output"}
    assert {v["precision"] for v in stored} == {"int8"}


def resident_fraction(tensor) -> float:
    """How much of `tensor`'s memory this process has mapped in (/proc/self/pagemap's present bit)."""
    page, start = 4096, tensor.data_ptr()
    first, last = start // page, (start + tensor.numel() * tensor.element_size() - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = f.read((last - first + 1) * 8)
    present = sum(entries[i + 7] >> 7 for i in range(0, len(entries), 8))
    return present / (last - first + 1)
