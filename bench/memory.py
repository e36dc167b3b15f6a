"""`python -m bench.memory [--quick]`: the memory the app holds with both models loaded, in its default
configuration, on checkpoints of the real 1B shapes with random weights (a Llama-3.2-1B-shaped chat model,
tied embeddings; a Llama-Guard-3-1B-shaped guard).

Each start runs in a fresh process as the app does (`Engine.load(..., interactive=True)`: the chat model in
its `auto` weight mode in a process of its own (model.isolated), compiled decoding warming in the background
as configured; the guard in its `auto` precision in the app's process, the TUI's modules imported), then one
turn through the real session path: the input check, a reply of `--reply-tokens` to a ~1k-token prompt,
strict mode's streaming checks. The first start builds the quantized caches (the guard's probe check is
recorded as passed: random weights cannot be judged by it); the second reads them, as every later start does. Per process: peak RSS (VmHWM), and at the end RSS, its
anonymous and file-backed parts, and PSS (shared pages counted once). Prints JSON; the last line is the
summary."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import LLAMA_1B, QUICK, emit, env_note, write_random_checkpoint

PROMPT = ("The river bends twice before it reaches the town, and fishermen leave at dawn. " * 60
          + "Tell me a long story about the sea.")


def memory_of(pid: int | str = "self") -> dict:
    """MB: peak RSS, RSS, its anonymous and file-backed parts, PSS."""
    out = {}
    for name in ("status", "smaps_rollup"):
        with open(f"/proc/{pid}/{name}", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "Pss"):
                    out[key] = round(int(rest.split()[0]) / 1024)
    return {"peak_rss_mb": out["VmHWM"], "rss_mb": out["VmRSS"], "anon_mb": out["RssAnon"],
            "file_mb": out["RssFile"], "pss_mb": out["Pss"], "largest_files_mb": largest_files(pid)}


def largest_files(pid, at_least_mb: int = 16) -> dict:
    """The mapped files holding the most resident memory: {file name: MB}."""
    sizes, name = {}, None
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if fields and not fields[0].endswith(":"):  # a mapping's header line: address, ..., path
                name = fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
            elif name and fields[0] == "Rss:":
                sizes[Path(name).name] = sizes.get(Path(name).name, 0) + int(fields[1]) / 1024
    return {k: round(v) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]) if v >= at_least_mb}


def measure(chat: str, guard_source: str, reply_tokens: int) -> dict:
    """One start of the app's engine and one turn; this process's and the model process's memory."""
    import app.tui.app  # noqa: F401  (the app's process holds the TUI's modules too)
    import guard.classifier
    from app.config import Config
    from app.engine import Engine
    from app.history import History
    from app.session import ChatSession, Done
    from app.engine import guard_settings
    from bench.guard import steer_to_safe
    from guard.precision import _record_path, _write
    from model.device import pick_device, pick_dtype
    from model.loading import resolve_source

    # Random weights answer neither 'safe' nor 'unsafe': the guard's self-test and probe check would refuse
    # them. Steer each guard model built to 'safe' on the full vocabulary (bench.guard does the same), and set
    # the threshold so that the two-row fast path, the one a real 'safe' verdict takes, says safe.
    init = guard.classifier.Guard.__init__

    def steered(self, model, tokenizer, **kw):
        steer_to_safe(model, tokenizer("safe", add_special_tokens=False)["input_ids"][0])
        init(self, model, tokenizer, **kw)

    guard.classifier.Guard.__init__ = steered
    config = Config()
    config.model.source, config.guard.source, config.guard.threshold = chat, guard_source, 0.9999999
    # Nor can random weights be judged by the probe check (their P(unsafe) is noise, which int8 moves by
    # more than the check allows): record it as passed, so the guard runs in the precision `auto` gives a
    # real guard that passes. tests/integration/test_guard_precision.py covers the check itself.
    dtype = pick_dtype(config.model.dtype, pick_device(config.model.device))
    _write(_record_path(resolve_source(guard_source), dtype, guard_settings(config)), {"passed": True, "reason": ""})
    config.generation.temperature, config.generation.max_new_tokens = 0.0, reply_tokens
    t0 = time.perf_counter()
    engine = Engine.load(config, use_guard=True, interactive=True)
    loaded_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as home:
        history = History(Path(home) / "history.sqlite3")
        session = ChatSession(history, config, engine)
        done = [e for e in session.send(PROMPT) if isinstance(e, Done)][-1]
        result = {"load_s": round(loaded_s, 1), "status": done.status, "reply_tokens": done.stats.get("new_tokens"),
                  "chat_quantize": engine.runner.quantize, "guard_precision": engine.guard.precision,
                  "app": memory_of(), "model_process": memory_of(engine.runner.pid)}
        history.close()
    engine.runner.close()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small shapes: a minute or two")
    p.add_argument("--reply-tokens", type=int, default=256)
    p.add_argument("--measure", nargs=2, metavar=("CHAT", "GUARD"), help=argparse.SUPPRESS)  # one start (internal)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure, args.reply_tokens)))
        return 0
    import torch

    shape = QUICK if args.quick else LLAMA_1B
    with tempfile.TemporaryDirectory(prefix="llama-chat-memory-") as tmp:
        chat, guard_source = (write_random_checkpoint(Path(tmp) / name, shape, dtype=torch.bfloat16, tied=tied, seed=seed)
                              for name, tied, seed in (("chat", True, 0), ("guard", False, 1)))
        env = {**os.environ, "LLAMA_CHAT_HOME": str(Path(tmp) / "home")}  # caches of their own
        starts = {}
        for start in ("first", "warm"):
            out = subprocess.run([sys.executable, "-m", "bench.memory", "--measure", str(chat), str(guard_source),
                                  "--reply-tokens", str(args.reply_tokens)],
                                 env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"the {start} start failed (exit {out.returncode})")
            starts[start] = json.loads(out.stdout.strip().splitlines()[-1])
            emit({"phase": f"{start} start", **starts[start]})
            if starts[start]["status"] != "complete":  # a blocked turn holds less than a real one
                raise SystemExit(f"the {start} start's turn ended {starts[start]['status']}, not complete")
    warm = starts["warm"]
    emit({"summary": "both models loaded, default configuration", "shape": "quick" if args.quick else "1B",
          "total_peak_rss_mb": warm["app"]["peak_rss_mb"] + warm["model_process"]["peak_rss_mb"],
          "total_pss_mb": warm["app"]["pss_mb"] + warm["model_process"]["pss_mb"],
          "first_start_total_peak_rss_mb": sum(starts["first"][k]["peak_rss_mb"] for k in ("app", "model_process")),
          "chat_quantize": warm["chat_quantize"], "guard_precision": warm["guard_precision"], **env_note()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
