"""`llama-chat` as a user runs it: real processes, a real history file, real models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.tiny_guard import KEYWORD


def run(*args, input=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, input=input,
                          timeout=timeout, env=os.environ.copy())


def test_bad_config_exits_2_naming_file_and_key(tmp_path):
    cfg = tmp_path / "home" / "config" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('[guard]\nthreshold = "high"\n')
    r = run("ask", "--no-guard", "hi")
    assert r.returncode == 2 and str(cfg) in r.stderr and "guard.threshold" in r.stderr
    assert "Traceback" not in r.stderr and cfg.read_text() == '[guard]\nthreshold = "high"\n'


def test_model_options_hold_before_and_after_the_subcommand():
    from app.cli import build_parser

    for argv in (["--demo", "--no-guard", "--quantize", "int4", "ask", "hi"],
                 ["ask", "--demo", "--no-guard", "--quantize", "int4", "hi"]):
        args = build_parser().parse_args(argv)
        assert (args.demo, args.no_guard, args.quantize, args.prompt) == (True, True, "int4", "hi"), argv
    args = build_parser().parse_args(["--quantize", "int8", "ask", "--quantize", "int4"])
    assert args.quantize == "int4" and args.model is None and not args.no_guard


def test_config_path_and_show():
    r = run("config", "path")
    assert r.returncode == 0 and r.stdout.strip().endswith("config/config.toml")
    r = run("config", "show")
    assert r.returncode == 0 and 'mode = "strict"' in r.stdout


def test_history_errors_are_clear():
    r = run("history", "show", "42")
    assert r.returncode == 1 and "No conversation with id 42" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_without_a_guard_model_it_refuses_to_answer(tiny_llama_dir):
    r = run("ask", "--model", str(tiny_llama_dir), "What is the capital of France?")
    assert r.returncode != 0 and r.stdout == ""
    assert "Llama Guard could not be loaded" in r.stderr and "--no-guard" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_smollm2_answers_paris_and_history_holds_it(smollm2_gguf):
    r = run("ask", "--model", str(smollm2_gguf), "--no-guard", "--temperature", "0", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "not screened" in r.stderr
    convs = json.loads(run("history", "list", "--json").stdout)
    assert len(convs) == 1 and convs[0]["title"] == "What is the capital of France?"
    shown = json.loads(run("history", "show", str(convs[0]["id"]), "--json").stdout)
    assert [(m["role"], m["status"]) for m in shown["messages"]] == [("user", "complete"), ("assistant", "complete")]
    assert "Paris" in shown["messages"][1]["content"] and shown["messages"][1]["guarded"] is False
    assert "Paris" in run("history", "search", "Paris").stdout
    assert run("history", "export", str(convs[0]["id"]), "--format", "md").stdout.startswith("# What is the capital")
    # --continue keeps the KV cache story honest: the second turn sees the first.
    r = run("ask", "--model", str(smollm2_gguf), "--no-guard", "--temperature", "0", "--continue", "--json",
            "And of Germany?")
    out = json.loads(r.stdout)
    assert out["conversation_id"] == convs[0]["id"] and "Berlin" in out["reply"] and out["status"] == "complete"
    assert out["stats"]["prompt_tokens"] > 40
    assert run("history", "delete", str(convs[0]["id"])).returncode == 0
    assert json.loads(run("history", "list", "--json").stdout) == []


@pytest.mark.slow
def test_guarded_ask_exit_codes_and_json(tiny_llama_dir, keyword_llama_dir, tiny_guard_dir):
    r = run("ask", "--model", str(tiny_llama_dir), "--guard-model", str(tiny_guard_dir), "--json",
            "--max-new-tokens", "8", "Tell me about bread.")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["status"] == "complete" and out["guarded"]
    assert {v["stage"] for v in out["verdicts"]} == {"input", "output"} and all(v["safe"] for v in out["verdicts"])
    r = run("ask", "--model", str(tiny_llama_dir), "--guard-model", str(tiny_guard_dir), f"Buy a {KEYWORD}?")
    assert r.returncode == 3 and "your message was Blocked by Llama Guard (Violent Crimes)" in r.stderr
    assert r.stdout.strip() == ""
    r = run("ask", "--model", str(keyword_llama_dir), "--guard-model", str(tiny_guard_dir), "--max-new-tokens", "24",
            "Say something.")
    assert r.returncode == 4 and KEYWORD not in r.stdout and "the reply was Blocked" in r.stderr


@pytest.mark.slow
def test_kill_9_mid_reply_keeps_message_and_partial_reply(tiny_llama_dir):
    p = subprocess.Popen([sys.executable, "-m", "app.cli", "ask", "--model", str(tiny_llama_dir), "--no-guard",
                          "--max-new-tokens", "7000", "Write a very long story."],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ.copy())
    os.set_blocking(p.stdout.fileno(), False)
    seen, deadline = b"", time.monotonic() + 120
    while len(seen) < 200 and time.monotonic() < deadline:
        seen += p.stdout.read() or b""
        time.sleep(0.05)
    time.sleep(1.0)  # past a database write of the streaming reply
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(seen) >= 200, "the reply never started streaming"
    conv = json.loads(run("history", "show", "1", "--json").stdout)
    user, reply = conv["messages"]
    assert user["content"] == "Write a very long story." and user["status"] == "complete"
    assert reply["status"] == "interrupted" and len(reply["content"]) >= 100
    assert seen.decode(errors="ignore").startswith(reply["content"][:50])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["strict", "fast"])
def test_kill_9_mid_reply_keeps_the_checks_of_what_was_shown(tiny_llama_dir, tiny_guard_dir, mode):
    env = {**os.environ, "LLAMA_CHAT_GUARD_CHECK_EVERY": "8", "LLAMA_CHAT_GUARD_MODE": mode}
    p = subprocess.Popen([sys.executable, "-m", "app.cli", "ask", "--model", str(tiny_llama_dir), "--guard-model",
                          str(tiny_guard_dir), "--guard-precision", "bf16", "--max-new-tokens", "7000",
                          "Write a very long story."], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    os.set_blocking(p.stdout.fileno(), False)
    seen, deadline = b"", time.monotonic() + 120
    while len(seen) < 200 and time.monotonic() < deadline:
        seen += p.stdout.read() or b""
        time.sleep(0.05)
    time.sleep(1.0)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(seen) >= 200, "the reply never started streaming"
    user, reply = json.loads(run("history", "show", "1", "--json").stdout)["messages"]
    assert [v["stage"] for v in user["verdicts"]] == ["input"]
    output = [v for v in reply["verdicts"] if v["stage"] == "output"]
    assert reply["status"] == "interrupted" and output and all(v["safe"] for v in output)
    if mode == "strict":  # only checked text was shown and stored
        assert reply["checked_chars"] is None
    else:  # shown before checked: the stored reply says how far its checks got
        assert 0 < reply["checked_chars"] <= len(reply["content"])


@pytest.mark.slow
def test_demo_mode_is_labelled(smollm2_gguf):
    r = run("ask", "--demo", "--temperature", "0", "--max-new-tokens", "12", "Hi!")
    assert r.returncode == 0 and "SmolLM2-135M-Instruct" in r.stderr and "unguarded" in r.stderr
