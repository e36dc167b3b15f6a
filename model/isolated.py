"""`RunnerProcess`: a `model.runner.Runner` in a process of its own, behind the same `ChatBackend` calls.

Why: in the app, decoding shared its process with the UI, and Python runs one thread at a time. A decode step
gives the interpreter lock up at every PyTorch op and kernel call (tens of times per token) and then waited
behind the UI's frames to take it back (README, `bench.tui --demo`). In a process of its own the model waits
for no lock. Only token ids cross (a pipe, in order): the prompt is still built here, from the same
tokenizer (the child sends it once loaded), so message text never becomes a control token, and
detokenizing, stop ids, the length budget and the turn's stats stay in `ChatBackend.stream`.

The child writes what it prints to `model-process.log` in the app's cache folder (it must not draw over the
terminal UI); it ends when told, or when this process goes (its pipe closes).
"""

from __future__ import annotations

import gc
import os
import pickle
import select
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Iterator

from model.backend import ChatBackend, TurnStats
from model.errors import LlamaChatError, ModelError
from model.loading import resolve_source
from model.sampling import Sampling

AVAILABLE = os.name == "posix"  # the child's pipe is passed as an inherited descriptor (pass_fds)
LOG_LIMIT = 1 << 20
CANCEL_POLL_S = 0.05  # how often a reply waiting for its first token (a long prompt) looks at its cancel event
SHOWN = ("tokenizer", "eos_ids", "defaults", "context_window", "name", "device", "quantize", "quantize_note")
PREFILL_STATS = ("cached_tokens", "prefill_tok_s")
SEND_EVERY_S = 0.02  # tokens decoded closer together than this cross together: the app's reading thread wakes
# once for them, not once a token (each wake-up takes a core from a decoding thread for a while; the UI draws
# at most 30 frames a second anyway)
SEND_EVERY_CPU_S = 0.1  # ... and on the CPU, where each wake-up stalls both decoding threads at their next
# barrier and the UI's frame pacing spaces its frames further apart than this (app.tui.app.pace_frames)


def readable_poll(conn: Connection):
    """A `select.poll` that says when `conn` has a message (or its other end is gone)."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return poller


def log_path():
    from model.host import app_cache_folder

    return app_cache_folder() / "model-process.log"


class RunnerProcess(ChatBackend):
    """Replies from a `Runner` loaded in a child process; `Runner.load`'s arguments, `progress` included."""

    def __init__(self, conn, process, source, load_args: dict):
        super().__init__()
        self._conn, self._process = conn, process
        self._poller = readable_poll(conn)  # see _readable
        self._source, self._load_args = source, load_args  # to start it again after it died
        self._send_lock = threading.Lock()
        self._unfinished = False  # a reply was left before its end: its remaining tokens are read and dropped

    @property
    def pid(self) -> int:
        """The model process's id (bench.memory reads its memory)."""
        return self._process.pid

    @classmethod
    def load(cls, src, *, progress=None, **load_args) -> "RunnerProcess":
        return cls.start(src, **load_args).wait_ready(progress)

    @classmethod
    def start(cls, src, **load_args) -> "RunnerProcess":
        """Start loading in the child and return at once (the caller may load the guard meanwhile)."""
        source = resolve_source(src)  # a wrong name fails here, at once, with the in-process message
        ours, theirs = socket.socketpair()
        log = log_path()
        log.parent.mkdir(parents=True, exist_ok=True)
        # A fresh interpreter running this module (not multiprocessing's spawn, which would import this
        # process's main script again), in a session of its own: the terminal's Ctrl+C and Ctrl+Z are the app's.
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        # Appended to (started afresh past LOG_LIMIT): a child started after one died keeps its account.
        with open(log, "a" if log.exists() and log.stat().st_size < LOG_LIMIT else "w") as out, theirs:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} loading {source.name}\n")
            out.flush()
            process = subprocess.Popen([sys.executable, "-m", "model.isolated", str(theirs.fileno())],
                                       pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
        conn = Connection(ours.detach())
        conn.send((source, load_args))
        return cls(conn, process, source, load_args)

    def wait_ready(self, progress=None) -> "RunnerProcess":
        """Relay the child's load messages to `progress` until the model is ready; raise what failed."""
        while True:
            kind, value = self._recv()
            if kind == "progress":
                if progress:
                    progress(value)
            elif kind == "error":
                self.close()
                raise value
            else:
                self.__dict__.update(value)
                return self

    # -- the pipe ------------------------------------------------------------------------------------
    def _failed(self) -> ModelError:
        self._unfinished = False  # nothing more will come
        try:
            code = self._process.wait(1)
        except subprocess.TimeoutExpired:
            code = "unknown: it is still running"
        return ModelError(
            f"The model's process stopped (exit code {code}); your next message starts it again. What it "
            f"printed is in {log_path()}.", title="Model stopped")

    def _recv(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError) as e:
            raise self._failed() from e

    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError as e:
            raise self._failed() from e

    def _settle(self) -> None:
        """Read the rest of a reply that was left early (stopped, or its stop id reached here first)."""
        while self._unfinished:
            kind, _ = self._recv()
            self._unfinished = kind not in ("end", "error")

    # -- ChatBackend ---------------------------------------------------------------------------------
    def _generate(self, ids: list[int], sampling: Sampling, stats: TurnStats,
                  cancel: threading.Event | None) -> Iterator[int]:
        if self._process.poll() is not None:
            self._start_again()
        self._settle()
        budget = min(sampling.max_new_tokens, self.context_window - len(ids))
        self._send(("generate", list(ids), sampling, budget))
        self._unfinished = True
        try:
            while True:
                while cancel is not None and not cancel.is_set() and not self._readable(CANCEL_POLL_S):
                    pass  # a long prompt: Esc is heard before its first token
                if cancel is not None and cancel.is_set():
                    return  # the child stops at its next token; `_settle` reads what it sent meanwhile
                kind, value = self._recv()
                if kind == "tokens":
                    yield from value
                    continue
                if kind == "error":
                    self._unfinished = False
                    raise value
                for k, v in value.items():  # "stats" after the prompt, "end" after the last token
                    setattr(stats, k, v)
                if kind == "end":
                    self._unfinished = False
                    return
        finally:
            if self._unfinished:
                self._send(("stop",))

    def _readable(self, timeout: float) -> bool:
        """`self._conn.poll(timeout)` in one system call: multiprocessing builds and closes a selector on every
        call, about a third of the app's CPU time per streamed token. (A Connection reads no further than the
        message it returns, so a readable pipe is a message waiting, or the child gone: recv then says so.)"""
        return bool(self._poller.poll(timeout * 1000))

    def _start_again(self) -> None:
        """A fresh child for one that died (its KV cache is gone: the next prompt is computed whole)."""
        self._conn.close()
        fresh = RunnerProcess.load(self._source, **self._load_args)
        self._conn, self._process, self._unfinished = fresh._conn, fresh._process, False
        self._poller = fresh._poller

    def reset(self) -> None:
        super().reset()
        self._command("reset")

    def clear_cache(self) -> None:
        self._command("clear_cache")

    def _command(self, name: str) -> None:
        self._settle()
        self._send((name,))

    def close(self) -> None:
        """End the child (it finishes the step it is in), and kill it if it does not end within seconds."""
        try:
            self._send(None)
        except ModelError:
            pass  # already gone
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._conn.close()


# -- the child ---------------------------------------------------------------------------------------
def portable(error: BaseException) -> BaseException:
    """`error` as it can cross the pipe (a LlamaChatError keeps its message and title)."""
    try:
        pickle.dumps(error)
        return error if isinstance(error, LlamaChatError) else ModelError(f"The model failed: {error}")
    except Exception:
        return ModelError(f"The model failed: {error}")


def serve(conn) -> None:
    """The child's main: load what the first message names, then answer one request at a time until told
    to end or the pipe closes."""
    source, load_args = conn.recv()
    from model.runner import Runner

    try:
        runner = Runner.load(source, progress=lambda text: conn.send(("progress", text)), **load_args)
    except BaseException as e:  # noqa: BLE001 - whatever failed, the parent must hear of it
        traceback.print_exc()
        conn.send(("error", portable(e)))
        return
    gc.freeze()  # the loaded objects stay: no full collection walks them mid-reply (as Workspace.attach does)
    conn.send(("ready", {k: getattr(runner, k) for k in SHOWN}))
    commands = {"reset": runner.reset, "clear_cache": runner.clear_cache}
    try:
        while (message := conn.recv()) is not None:
            if message[0] == "generate":
                answer(conn, runner, *message[1:])
            elif message[0] in commands:
                commands[message[0]]()
            # a "stop" read here was for a reply that had already ended
    except (EOFError, OSError):
        pass  # the app is gone
    runner.close()


def answer(conn, runner, ids: list[int], sampling: Sampling, budget: int) -> None:
    """Send the reply's token ids as they come (the first at once, later ones in batches SEND_EVERY_S or, on
    the CPU, SEND_EVERY_CPU_S apart), up to a stop id, the budget or a message from the parent (a stop, or the
    end), then its stats. Exactly one "end" or "error" closes every request."""
    stats = TurnStats()
    tokens = runner._generate(ids, sampling, stats, None)
    n, pending, sent = 0, [], 0.0
    every = SEND_EVERY_CPU_S if runner.device == "cpu" else SEND_EVERY_S
    heard = readable_poll(conn)  # the parent's messages, one system call a token (see RunnerProcess._readable)
    try:
        for token in tokens:
            if n == 0:
                conn.send(("stats", {k: getattr(stats, k) for k in PREFILL_STATS}))
            pending.append(token)
            n += 1
            last = token in runner.eos_ids or n >= budget or bool(heard.poll(0))
            if last or time.monotonic() - sent >= every:
                conn.send(("tokens", pending))
                pending, sent = [], time.monotonic()
            if last:
                break
    except Exception as e:  # noqa: BLE001 - the reply fails, the process goes on
        traceback.print_exc()
        conn.send(("error", portable(e)))
        return
    finally:
        tokens.close()
    conn.send(("end", {"compiled_steps": stats.compiled_steps}))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
