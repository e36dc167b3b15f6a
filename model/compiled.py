"""Compiled decode steps: `torch.compile` over static KV caches of bucketed length.

A static cache attends over its whole length at every step, so one large cache would make short
conversations pay for the longest. Caches come in buckets (512, 1024, 1536, 2048, 3072, ...) and the
runner moves the conversation into the smallest compiled bucket that holds it, or back to its dynamic
cache (eager) when the next bucket is not compiled yet, between any two tokens. Each bucket is compiled once, in a
background thread, so nobody waits for it: replies decode eagerly until their bucket is ready. Inductor's
compiled code is kept in the app's cache folder (unless TORCHINDUCTOR_CACHE_DIR says otherwise), so
later starts only re-trace.

If compilation fails (no C++ compiler, an unsupported op), the error is kept in `error` and decoding
stays eager: compiling is an optimisation, never a requirement.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

# Steps of 1.5-2x: a 1.1k-token chat in a 1536 bucket decoded int4 at 33.3 tok/s, in a 2048 one at 27.8-31.8.
BUCKETS = (512, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 32768, 65536, 131072)


def bucket_for(positions: int) -> int | None:
    return next((b for b in BUCKETS if b >= positions), None)


def can_compile() -> str | None:
    """None when torch.compile can work here; else why not."""
    from model.host import find_cxx

    if find_cxx() is None:
        return "no C++ compiler found (torch.compile's CPU backend needs one)"
    return None


_running: set[threading.Thread] = set()  # compile threads at work
_exiting = threading.Event()


@atexit.register
def _let_compiles_finish() -> None:
    """At exit, wait for a compile in progress (no new one starts). A daemon thread still inside torch
    when the interpreter finalizes is killed through C++ frames that forbid it, and the process aborts
    ("terminate called without an active exception"). Commands end with `exit_process` instead, which
    does not wait; this is for other hosts (tests, notebooks)."""
    _exiting.set()
    for thread in list(_running):
        thread.join()


def exit_process(code: int):
    """`sys.exit(code)`, but background threads still at work (a compile, up to ~30 s cold; in the app a
    reply, a check or a model load) are abandoned, not waited for: the process ends at once, with `code`,
    after flushing its output. What they store is in SQLite transactions: a cut one leaves nothing."""
    if any(t.is_alive() for t in threading.enumerate() if t is not threading.main_thread()):
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


def _user_inductor_cache() -> bool:
    """Whether TORCHINDUCTOR_CACHE_DIR was chosen by the user. Importing torch._dynamo (transformers does,
    while loading a model) sets it to torch's default under /tmp, so "set" alone does not tell."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return current is not None
    return current is not None and current != default_cache_dir()


class CompiledDecoder:
    """Compiled one-token steps of `model` over per-bucket static caches."""

    def __init__(self, model, *, max_positions: int, cache_folder: Path | None = None, start: bool = True):
        import torch

        if not _user_inductor_cache():
            from model.host import app_cache_folder

            cache_folder = Path(cache_folder or app_cache_folder() / "inductor")
            cache_folder.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_folder)
        self.model = model
        self._largest = bucket_for(max_positions) or BUCKETS[-1]  # the bucket that covers the window
        self.error: str | None = can_compile()
        self._caches: dict = {}  # bucket -> its StaticCache, present once compiled
        self._queued: set[int] = set()
        self._todo: queue.Queue[int] = queue.Queue()
        # Guards on module attributes are skipped (guard_filter_fn below), so a graph compiled for an
        # earlier model in this process would be reused for this one: forget those graphs.
        torch._dynamo.reset()
        self._compiled = torch.compile(self._forward, dynamic=False,
                                       options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        self._lock = threading.Lock()
        self._idle = True  # False while a reply decodes (see pause)
        self._thread: threading.Thread | None = None
        self._started = False
        if start:
            self.start()

    def start(self) -> None:
        """Begin compiling what `want` asked for."""
        self._started = True
        self._kick()

    def _kick(self) -> None:
        # One short-lived thread per batch of work: a thread kept waiting after it ran compiled kernels
        # slowed every later step by ~15% on a 2-core CPU (measured: 16.3 -> 21.0 tok/s once it exited).
        with self._lock:
            if (self._started and self._idle and self._thread is None and not self._todo.empty()
                    and self.error is None and not _exiting.is_set()):
                self._thread = threading.Thread(target=self._drain, name="compile-decode", daemon=True)
                _running.add(self._thread)
                self._thread.start()

    def pause(self) -> None:
        """A reply is decoding: start no compile until `resume`. Beside a reply, tracing (Python, holding
        the GIL in turns) and the C++ compiler slowed a small model's decoding 3-10x on 2 cores."""
        self._idle = False

    def resume(self) -> None:
        self._idle = True
        self._kick()

    def _forward(self, ids, cache):
        return self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]

    def step(self, x, cache):
        """One decode step (`x` is a [1, 1] id tensor) on a cache from `cache_for`."""
        return self._compiled(x, cache)

    def want(self, positions: int) -> None:
        """Compile, in the background, the bucket for `positions` (and the next one once it is 3/4 full)."""
        b = bucket_for(positions)
        new = [bucket for bucket in (b, bucket_for(b + 1) if b and positions > b * 3 // 4 else None)
               if bucket and bucket <= self._largest and bucket not in self._queued]
        if new and not self.error:  # called before every decode step: nothing to do is the usual case
            self._queued.update(new)
            for bucket in new:
                self._todo.put(bucket)
            self._kick()

    def cache_for(self, positions: int):
        """The static cache of the smallest compiled bucket holding `positions`, or None (decode eagerly)."""
        b = bucket_for(positions)
        return self._caches.get(b) if b else None

    def wait(self, positions: int, timeout: float | None = None) -> bool:
        """Block until the bucket for `positions` is compiled (tests, benchmarks); False on error/timeout."""
        import time

        self.want(positions)
        end = None if timeout is None else time.monotonic() + timeout
        while self.cache_for(positions) is None and not self.error and (end is None or time.monotonic() < end):
            time.sleep(0.05)
        return self.cache_for(positions) is not None

    @property
    def busy(self) -> bool:
        """Whether a compile is queued or running (it competes with decoding for the CPU meanwhile)."""
        return self._todo.unfinished_tasks > 0 and self.error is None

    def close(self) -> None:
        """Stop compiling and let go of the static caches (the model is being replaced)."""
        self.error = self.error or "closed"
        self._caches = {}

    def _drain(self) -> None:
        while True:
            with self._lock:
                if self._todo.empty() or self.error is not None or not self._idle or _exiting.is_set():
                    _running.discard(self._thread)
                    self._thread = None
                    return
                bucket = self._todo.get()
            try:
                self._caches[bucket] = self._warm(bucket)
            except Exception as e:  # noqa: BLE001 - compiling is optional; stay eager and say why
                self.error = f"{type(e).__name__}: {e}"
                if not _exiting.is_set():  # at exit, inductor refuses new work: nothing to report
                    log.warning("compiled decoding is off: %s", self.error)
            finally:
                self._todo.task_done()

    def _warm(self, bucket: int):
        import torch
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=bucket)
        with torch.inference_mode():  # as the runner decodes: tensors made outside it would recompile
            x = torch.zeros((1, 1), dtype=torch.long, device=self.model.device)
            self.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)  # allocates the cache eagerly
            for _ in range(2):  # the first call compiles; the second checks nothing recompiles
                self.step(x, cache)
        cache.crop(-int(cache.get_seq_length()))
        return cache
