"""User mistakes and closed pipes at the command line end with a clear message (or quietly), never with
"unexpected error": real processes, a real history file."""

from __future__ import annotations

import os
import subprocess
import sys

from app.history import History


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "app.cli", *args], input=stdin, capture_output=True, timeout=120,
                          env=os.environ.copy())


def test_ids_beyond_sqlite_integers_are_usage_errors():
    for args in (["history", "show", str(2**64)], ["history", "delete", "-3"], ["history", "export", "x1"],
                 ["ask", "--conversation", str(2**63), "hi"]):
        r = cli(*args)
        err = r.stderr.decode()
        assert r.returncode == 2 and "is not a conversation id" in err and "unexpected" not in err, (args, err)


def test_invalid_utf8_on_stdin_is_named_before_any_model_loads():
    r = cli("ask", "--no-guard", "-", stdin=b"caf\xe9 au lait\n")
    err = r.stderr.decode()
    assert r.returncode == 2 and "Standard input is not UTF-8 text (byte 3 is b'\\xe9')" in err
    assert "unexpected" not in err and "Traceback" not in err


def test_a_reader_that_stops_early_is_not_an_error():
    history = History()
    for i in range(1500):  # more than a pipe's buffer of output
        cid = history.create_conversation(f"A conversation about Paris, number {i}, with a long title")
        history.add_message(cid, "user", f"Tell me about Paris {i}")
    history.close()
    for args in (["history", "list", "--json"], ["history", "list"], ["history", "search", "paris"]):
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=os.environ.copy())
        proc.stdout.read(10)
        proc.stdout.close()  # as `| head -c 10` does
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 0 and err == "", (args, err)


def test_demo_with_a_guard_that_cannot_load_never_claims_to_run_unguarded(tmp_path, smollm2_gguf):
    r = cli("ask", "--demo", "--guard-model", str(tmp_path / "no-such-guard"), "hi")
    err = r.stderr.decode()
    assert r.returncode == 1 and "Llama Guard could not be loaded" in err and "running unguarded" not in err


def test_version():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.decode().strip() == "llama-chat 0.1.0"
