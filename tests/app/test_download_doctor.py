"""`download` against a local stand-in for the Hub (loopback only), and `doctor`."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest


class GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers every request the way the Hub answers for a gated repo without access."""

    def do_GET(self):
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model meta-llama/Llama-3.2-1B-Instruct is restricted.")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Access to model is restricted"}')

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def gated_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_gated_repo_explains_license_and_token(gated_hub):
    env = {**os.environ, "HF_ENDPOINT": gated_hub, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test"}
    r = subprocess.run([sys.executable, "-m", "app.cli", "download"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "is gated" in r.stderr and "accept the Llama 3.2 Community License" in r.stderr
    assert "hf auth login" in r.stderr and "HF_TOKEN" in r.stderr


def test_doctor_reports_device_models_and_locations(tmp_path):
    r = subprocess.run([sys.executable, "-m", "app.cli", "doctor"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "device        cpu" in r.stdout and "torch" in r.stdout
    from model.qkernel import variant

    assert f"int8/int4     native {variant()} kernel" in r.stdout if variant() else "PyTorch's kernels (" in r.stdout


def test_doctor_names_the_forced_kernel_and_a_slow_mode(tmp_path):
    env = {**os.environ, "LLAMA_CHAT_KERNEL": "torch", "LLAMA_CHAT_MODEL_QUANTIZE": "int4",
           "LLAMA_CHAT_MODEL_DTYPE": "float32"}
    r = subprocess.run([sys.executable, "-m", "app.cli", "doctor"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "int8/int4     PyTorch's kernels (LLAMA_CHAT_KERNEL=torch asks for PyTorch's kernels)" in r.stdout
    assert "weights       bf16 (asked: int4) - --quantize int4 needs the native int8/int4 kernel" in r.stdout
    assert "chat model    meta-llama/Llama-3.2-1B-Instruct (local): missing" in r.stdout
    assert "guard         on" in r.stdout and str(tmp_path / "home" / "data" / "history.sqlite3") in r.stdout
