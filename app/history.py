"""Local history: conversations, messages and guard verdicts in SQLite.

WAL mode and short write transactions let two running instances share the file safely. A reply is
written while it streams; a process that dies mid-reply leaves it marked `streaming` with its pid, and
the next start marks it `interrupted`. Schema changes are named migrations recorded in a table.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from app.errors import HistoryError
from app.paths import database_file, private_dir

STATUSES = ("complete", "streaming", "stopped", "blocked", "error", "interrupted")


def _m001_initial(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE conversations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            title TEXT NOT NULL,
            system_prompt TEXT NOT NULL DEFAULT '',
            model TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL,
            guarded INTEGER NOT NULL DEFAULT 1,
            stats TEXT,
            writer_pid INTEGER,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )"""
    )
    db.execute("CREATE INDEX messages_by_conversation ON messages(conversation_id, id)")
    db.execute(
        """CREATE TABLE verdicts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            stage TEXT NOT NULL CHECK (stage IN ('input', 'output')),
            safe INTEGER NOT NULL,
            categories TEXT NOT NULL DEFAULT '[]',
            score REAL,
            latency_s REAL,
            guard_model TEXT NOT NULL DEFAULT '',
            reason TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL
        )"""
    )
    db.execute("CREATE INDEX verdicts_by_message ON verdicts(message_id)")


def _m002_search(db: sqlite3.Connection) -> None:
    """Full-text search over message text, kept in step by triggers (deletes leave the index too)."""
    db.execute("CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='id')")
    db.execute("INSERT INTO messages_fts(rowid, content) SELECT id, content FROM messages")
    db.execute(
        """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
        END"""
    )
    db.execute(
        """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
        END"""
    )
    db.execute(
        """CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
            INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
        END"""
    )


def _m003_verdict_precision(db: sqlite3.Connection) -> None:
    """How the guard computed each verdict: int8, bf16 or fp32 (guard.precision); '' before this."""
    db.execute("ALTER TABLE verdicts ADD COLUMN precision TEXT NOT NULL DEFAULT ''")


def _m004_writer_started(db: sqlite3.Connection) -> None:
    """When a streaming reply's writer process started: with its pid, a live process that reused a dead
    writer's pid is not taken for the writer (history.process_start)."""
    db.execute("ALTER TABLE messages ADD COLUMN writer_started INTEGER")


MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = [
    ("001_initial", _m001_initial),
    ("002_search", _m002_search),
    ("003_verdict_precision", _m003_verdict_precision),
    ("004_writer_started", _m004_writer_started),
]


@dataclass
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    status: str
    guarded: bool
    stats: dict | None
    created_at: float
    verdicts: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"id": self.id, "role": self.role, "content": self.content, "status": self.status,
                "guarded": self.guarded, "stats": self.stats, "created_at": self.created_at, "verdicts": self.verdicts}


@dataclass
class Conversation:
    id: int
    title: str
    system_prompt: str
    model: str
    created_at: float
    updated_at: float
    messages: list[Message] = field(default_factory=list)

    def to_dict(self, with_messages: bool = True) -> dict:
        d = {"id": self.id, "title": self.title, "system_prompt": self.system_prompt, "model": self.model,
             "created_at": self.created_at, "updated_at": self.updated_at}
        if with_messages:
            d["messages"] = [m.to_dict() for m in self.messages]
        return d


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat), or None where that is unknown:
    with its pid it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _writer_alive(pid: int | None, started: int | None) -> bool:
    """Whether the process that wrote a streaming reply still runs: its pid is alive and, where start times
    are known, started when the writer did (a dead writer's pid may belong to another process now)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started is None or process_start(pid) in (None, started)


def title_from(text: str, limit: int = 60) -> str:
    line = " ".join(text.split())
    return (line[: limit - 1] + "…") if len(line) > limit else (line or "New chat")


class History:
    """One SQLite database file. Safe to use from one thread at a time per instance."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else database_file()
        private_dir(self.path.parent)
        # A file its owner made read-only stays so: it is opened for reading, and storing says why it cannot.
        mode = self.path.stat().st_mode if self.path.exists() else None
        self.read_only = mode is not None and not mode & stat.S_IWUSR
        old_umask = os.umask(0o077)  # the database, its WAL and shm files: owner only
        try:
            uri = f"{self.path.resolve().as_uri()}{'?mode=ro' if self.read_only else ''}"
            self.db = sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise HistoryError(f"Cannot open the history database {self.path}: {e}") from e
        finally:
            os.umask(old_umask)
        if mode is None or mode & 0o077:
            os.chmod(self.path, (mode or 0o600) & 0o700)  # owner only; the owner's own bits as they were
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=10000")
        if not self.read_only:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.migrate()
            self.mark_interrupted()

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction, taking the write lock up front so two instances never deadlock."""
        if self.read_only:
            raise HistoryError(f"The history file {self.path} is read-only, so nothing can be stored or changed; "
                               f"it was left as it is. To store chats again: chmod u+w {self.path}",
                               title="History is read-only")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- schema ----------------------------------------------------------------------------------
    def migrate(self, upto: str | None = None) -> list[str]:
        """Apply the migrations not yet recorded (up to and including `upto`); returns their names."""
        with self.write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
            done = {r[0] for r in db.execute("SELECT name FROM migrations")}
            applied = []
            for name, fn in MIGRATIONS:
                if name not in done:
                    fn(db)
                    db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))
                    applied.append(name)
                if name == upto:
                    break
        return applied

    def mark_interrupted(self) -> int:
        """Replies left `streaming` by a process that is gone become `interrupted`."""
        rows = self.db.execute("SELECT id, writer_pid, writer_started FROM messages WHERE status = 'streaming'").fetchall()
        dead = [r["id"] for r in rows if not _writer_alive(r["writer_pid"], r["writer_started"])]
        if dead:
            with self.write() as db:
                db.executemany("UPDATE messages SET status = 'interrupted', writer_pid = NULL, writer_started = NULL"
                               " WHERE id = ?", [(i,) for i in dead])
        return len(dead)

    # -- conversations ---------------------------------------------------------------------------
    def create_conversation(self, title: str, *, system_prompt: str = "", model: str = "") -> int:
        now = time.time()
        with self.write() as db:
            cur = db.execute(
                "INSERT INTO conversations (title, system_prompt, model, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (title_from(title), system_prompt, model, now, now),
            )
            return cur.lastrowid

    def _touch(self, db, conversation_id: int) -> None:
        db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), conversation_id))

    def update_conversation(self, conversation_id: int, **fields) -> None:
        allowed = {"title", "system_prompt", "model"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"can update only {', '.join(sorted(allowed))}")
        self.get_conversation(conversation_id, with_messages=False)
        if "title" in fields:
            fields["title"] = title_from(fields["title"], limit=120)
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.write() as db:
            db.execute(f"UPDATE conversations SET {sets} WHERE id = ?", (*fields.values(), conversation_id))
            self._touch(db, conversation_id)

    def list_conversations(self, limit: int | None = None) -> list[Conversation]:
        sql = "SELECT * FROM conversations ORDER BY updated_at DESC, id DESC"
        rows = self.db.execute(sql + (" LIMIT ?" if limit else ""), (limit,) if limit else ()).fetchall()
        return [self._conversation(r) for r in rows]

    def latest_conversation_id(self) -> int | None:
        row = self.db.execute("SELECT id FROM conversations ORDER BY updated_at DESC, id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def get_conversation(self, conversation_id: int, *, with_messages: bool = True) -> Conversation:
        row = self.db.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise HistoryError(f"No conversation with id {conversation_id}. `llama-chat history list` shows them.")
        conv = self._conversation(row)
        if with_messages:
            conv.messages = self.messages(conversation_id)
        return conv

    def delete_conversation(self, conversation_id: int) -> None:
        self.get_conversation(conversation_id, with_messages=False)
        with self.write() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    @staticmethod
    def _conversation(r) -> Conversation:
        return Conversation(r["id"], r["title"], r["system_prompt"], r["model"], r["created_at"], r["updated_at"])

    # -- messages --------------------------------------------------------------------------------
    def add_message(self, conversation_id: int, role: str, content: str, *, status: str = "complete",
                    guarded: bool = True) -> int:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        now = time.time()
        pid = os.getpid() if status == "streaming" else None
        with self.write() as db:
            cur = db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, guarded, writer_pid, writer_started,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, role, content, status, int(guarded), pid, pid and process_start(pid), now, now),
            )
            self._touch(db, conversation_id)
            return cur.lastrowid

    def update_message(self, message_id: int, *, content: str | None = None, status: str | None = None,
                       stats: dict | None = None) -> None:
        sets, args = ["updated_at = ?"], [time.time()]
        if content is not None:
            sets.append("content = ?")
            args.append(content)
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"unknown status {status!r}")
            sets.append("status = ?")
            args.append(status)
            if status != "streaming":
                sets.append("writer_pid = NULL")
        if stats is not None:
            sets.append("stats = ?")
            args.append(json.dumps(stats))
        with self.write() as db:
            db.execute(f"UPDATE messages SET {', '.join(sets)} WHERE id = ?", (*args, message_id))

    def add_verdict(self, message_id: int, verdict) -> None:
        with self.write() as db:
            db.execute(
                "INSERT INTO verdicts (message_id, stage, safe, categories, score, latency_s, guard_model, reason,"
                " precision, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (message_id, verdict.stage, int(verdict.safe), json.dumps(list(verdict.categories)), verdict.score,
                 verdict.latency_s, verdict.guard_model, verdict.reason, getattr(verdict, "precision", ""), time.time()),
            )

    def messages(self, conversation_id: int) -> list[Message]:
        rows = self.db.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)).fetchall()
        verdicts: dict[int, list[dict]] = {}
        for v in self.db.execute(
            "SELECT v.* FROM verdicts v JOIN messages m ON m.id = v.message_id WHERE m.conversation_id = ? ORDER BY v.id",
            (conversation_id,),
        ):
            verdicts.setdefault(v["message_id"], []).append(self._verdict(v))
        return [
            Message(r["id"], r["conversation_id"], r["role"], r["content"], r["status"], bool(r["guarded"]),
                    json.loads(r["stats"]) if r["stats"] else None, r["created_at"], verdicts.get(r["id"], []))
            for r in rows
        ]

    @staticmethod
    def _verdict(v) -> dict:
        from guard.categories import display_name

        codes = json.loads(v["categories"])
        return {"stage": v["stage"], "safe": bool(v["safe"]), "categories": codes,
                "category_names": [display_name(c) for c in codes], "score": v["score"], "latency_s": v["latency_s"],
                "guard_model": v["guard_model"], "reason": v["reason"],
                "precision": v["precision"] if "precision" in v.keys() else ""}  # a read-only file may be older

    def delete_messages_from(self, message_id: int) -> None:
        """Delete a message and every later message of its conversation (an edit replaces the branch)."""
        row = self.db.execute("SELECT conversation_id FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise HistoryError(f"No message with id {message_id}.")
        with self.write() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (row[0], message_id))
            self._touch(db, row[0])

    # -- search and export -----------------------------------------------------------------------
    def search(self, text: str, limit: int | None = None, offset: int = 0) -> list[dict]:
        """Every conversation with a message that matches all words of `text` (FTS5; each word also matches
        as a prefix, `Pari` finds `Paris`; operators are taken literally), best match first, one row per
        conversation with its best message and a snippet; `limit`/`offset` page through them."""
        terms = [t.replace('"', '""') for t in text.split()]
        if not terms:
            return []
        query = " ".join(f'"{t}"*' for t in terms)
        rows = self.db.execute(
            "WITH hits AS (SELECT m.conversation_id AS cid, m.id AS mid, messages_fts.rank AS rank,"
            "   snippet(messages_fts, 0, '[', ']', '…', 12) AS snippet"
            "   FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid WHERE messages_fts MATCH ?),"
            " best AS (SELECT *, ROW_NUMBER() OVER (PARTITION BY cid ORDER BY rank, mid) AS n FROM hits)"
            " SELECT best.cid, c.title, best.mid, best.snippet FROM best JOIN conversations c ON c.id = best.cid"
            " WHERE n = 1 ORDER BY rank, best.cid DESC LIMIT ? OFFSET ?",
            (query, -1 if limit is None else limit, offset),
        ).fetchall()
        return [{"conversation_id": r[0], "title": r[1], "message_id": r[2], "snippet": r[3]} for r in rows]

    def export(self, conversation_id: int, fmt: str = "md") -> str:
        conv = self.get_conversation(conversation_id)
        if fmt == "json":
            return json.dumps(conv.to_dict(), ensure_ascii=False, indent=2)
        if fmt != "md":
            raise ValueError(f"unknown export format {fmt!r}; use md or json")
        return to_markdown(conv)


def to_markdown(conv: Conversation) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conv.created_at))
    out = [f"# {conv.title}", "", f"_{when} · {conv.model or 'model not recorded'}_", ""]
    if conv.system_prompt:
        out += ["> **System:** " + conv.system_prompt.replace("\n", "\n> "), ""]
    for m in conv.messages:
        who = "You" if m.role == "user" else "Assistant"
        badge = "" if m.status == "complete" else f" _({m.status})_"
        out += [f"## {who}{badge}", ""]
        out += ["_Blocked by Llama Guard; the text is kept in the database only._" if m.status == "blocked" else m.content, ""]
        for v in m.verdicts:
            mark = "passed" if v["safe"] else "blocked: " + (", ".join(v["category_names"]) or v["reason"])
            out.append(f"- Llama Guard ({v['stage']}): {mark}, score {v['score'] or 0:.2f}")
        if not m.guarded:
            out.append("- not screened (guard off)")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
