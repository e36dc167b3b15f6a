"""`python -m bench.history [--messages N]`: full-text search over a large history: every conversation that
matches, the time to find them all and the time to a first page. Prints JSON; the last line is the summary."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import emit, env_note


def fill(history, conversations: int, per_conversation: int, word_every: int) -> set[int]:
    """Many conversations, fast (one transaction); every `word_every`-th one mentions Paris in one message.
    Returns the ids of those."""
    import time as _time

    now, with_word = _time.time(), set()
    with history.write() as db:
        for c in range(conversations):
            cid = db.execute("INSERT INTO conversations (title, created_at, updated_at) VALUES (?, ?, ?)",
                             (f"Chat {c}", now, now)).lastrowid
            rows = [(cid, "user" if i % 2 == 0 else "assistant", f"Message {i} about bread, rivers and trains.",
                     "complete", now, now) for i in range(per_conversation)]
            if c % word_every == 0:
                rows[per_conversation // 2] = (cid, "user", "What is the capital of France? Paris, I think.",
                                               "complete", now, now)
                with_word.add(cid)
            db.executemany("INSERT INTO messages (conversation_id, role, content, status, created_at, updated_at)"
                           " VALUES (?, ?, ?, ?, ?, ?)", rows)
    return with_word


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__)
    p.add_argument("--messages", type=int, default=100_000)
    args = p.parse_args(argv)
    from app.history import History

    with tempfile.TemporaryDirectory() as folder:
        history = History(Path(folder) / "history.sqlite3")
        t0 = time.perf_counter()
        want = fill(history, args.messages // 100, 100, 2)
        fill_s = time.perf_counter() - t0
        timings = {}
        for name, kw in (("all", {}), ("first_page", {"limit": 50})):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                hits = history.search("paris", **kw)
                best = min(best, time.perf_counter() - t0)
            timings[name] = (best, len(hits))
        history.close()
    emit({"messages": args.messages, "matching_conversations": len(want), "found": timings["all"][1],
          "search_all_s": round(timings["all"][0], 4), "search_first_page_s": round(timings["first_page"][0], 4),
          "fill_s": round(fill_s, 2), **env_note()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
