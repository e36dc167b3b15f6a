"""The guard's precision: its prompt work on the native int8 kernels, used only once it has proved itself.

An int8 guard (int8 weights per output channel and int8 activations per block of 32, model.qkernel) is
built once per checkpoint and cached like the chat model's quantized weights (model.qcache). Before it is
first used, every probe conversation of assets/guard_probes.json (safe and unsafe, input and output checks,
Llama Guard 3's 8 languages, each of S1-S13) is checked by the full-precision guard and by the int8 one:
if any verdict differs, or P(unsafe) is more than MAX_SCORE_GAP apart on any probe, int8 is refused and the
full-precision guard is used, and the guard's `precision_note` says why. The outcome is kept beside the
quantized weights, so later starts skip the probes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

PRECISIONS = ("auto", "bf16", "int8")
MAX_SCORE_GAP = 0.05


def pick_precision(requested: str, device: str) -> tuple[str, str]:
    """(the precision to try, a sentence for the user or ""): `auto` is int8 on a CPU where the native
    kernel runs, else full precision; an explicit int8 that cannot run here is full precision, said why."""
    if requested not in PRECISIONS:
        raise ValueError(f"guard precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested == "bf16":
        return "bf16", ""
    if device.split(":")[0] != "cpu":
        why = f"int8 checks are for the CPU; on {device} the guard runs unquantized"
    else:
        from model.qkernel import available

        why = available()
    if why is None:
        return "int8", ""
    return "bf16", "" if requested == "auto" else f"guard precision int8 needs the native int8 kernel ({why}); the guard runs unquantized"


def full_precision_name(dtype) -> str:
    """What a verdict records for an unquantized guard: bf16, fp32 or fp16, as it computed."""
    return {"torch.bfloat16": "bf16", "torch.float32": "fp32", "torch.float16": "fp16"}.get(str(dtype), str(dtype))


def probes() -> list[dict]:
    from assets import read_text

    return json.loads(read_text("guard_probes.json"))["probes"]


def conversation(probe: dict) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(probe["messages"])]


def compare(reference, candidate) -> str | None:
    """None when `candidate` judges every probe as `reference` does; else what differed first."""
    for i, probe in enumerate(probes()):
        messages = conversation(probe)
        a, b = reference.check(messages), candidate.check(messages)
        if a.safe != b.safe or a.categories != b.categories or abs(a.score - b.score) > MAX_SCORE_GAP:
            return (f"probe {i + 1} ({probe['lang']}, {'input' if len(messages) % 2 else 'output'} check): full "
                    f"precision {a.describe()} at P(unsafe) {a.score:.3f}, int8 {b.describe()} at {b.score:.3f}")
    return None


def _record_path(source, dtype, settings) -> Path:
    """Where the probe outcome for this checkpoint, activation dtype, probe set and guard settings is kept:
    beside the int8 weights it judged (their cache key)."""
    from model.qcache import cache_key, quantized_folder

    from assets import read_text

    what = json.dumps([read_text("guard_probes.json"), settings.threshold, list(settings.excluded), settings.policy])
    key = cache_key(source, "int8", dtype, "native")
    return quantized_folder() / "guard-probes" / f"{key}-{hashlib.sha256(what.encode()).hexdigest()[:12]}.json"


def probe_outcome(source, dtype, settings) -> dict | None:
    """{"passed": bool, "reason": str} from an earlier start's probe check, or None (not checked yet)."""
    return _read(_record_path(source, dtype, settings))


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("passed"), bool) else None


def _write(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
    except OSError:  # a read-only cache: the probes run again next time
        pass


def load_int8(guard_cls, source, dtype, settings, progress=None):
    """The int8 guard for `source` if it passes the probes (now or on an earlier start), else the
    full-precision one with `precision_note` saying why."""
    from model.loading import load_checkpoint, load_model, load_tokenizer
    from model.qcache import load_quantized

    from guard.moderator import GuardError

    say = progress or (lambda text: None)
    path = _record_path(source, dtype, settings)
    known = _read(path)  # probe_outcome

    def full(note: str):
        loaded = load_checkpoint(source, device="cpu", dtype=dtype)
        guard = guard_cls(loaded.model, loaded.tokenizer, name=source.name, settings=settings)
        guard.precision_note = note
        return guard

    if known is not None and not known["passed"]:
        return full(f"int8 refused: {known['reason']}")
    model, tokenizer = load_quantized(source, "int8", dtype=dtype, cache_folder=None,
                                      build=lambda: load_model(source, dtype), alongside=lambda: load_tokenizer(source),
                                      progress=say, mapped=("lm_head",))
    try:
        # A passed probe check means these weights passed the self-test too (the start that checked them ran
        # it first), so it is not run again: it is what reads the whole output layer, memory-mapped here.
        candidate = guard_cls(model.eval(), tokenizer, name=source.name, settings=settings, self_test=known is None)
    except GuardError as e:  # the int8 model fails the self-test that the full one may pass
        problem = f"the int8 model failed the load-time self-test: {e.message}"
        _write(path, {"passed": False, "reason": problem})
        return full(f"int8 refused: {problem}")
    if known is not None:
        return candidate
    say(f"Checking the int8 guard against full precision on {len(probes())} probe conversations (first start only)…")
    reference = full("")
    problem = compare(reference, candidate)
    _write(path, {"passed": problem is None, "reason": problem or ""})
    if problem is None:
        return candidate
    reference.precision_note = f"int8 refused: {problem}"
    return reference
