"""Local history: conversations, messages and guard verdicts in SQLite.

WAL mode and short write transactions let two running instances share the file safely; opening and
reading never take the write lock, and reading commands open the file read-only. A reply is written
while it streams; a process that dies mid-reply leaves it marked `streaming` with its pid, and the
next start marks it `interrupted`. Each reply records the message it answers (`parent_id`), so turns
of two writers on one conversation never pair a question with another's answer. Schema changes are
named migrations recorded in a table. SQLite's failures (a damaged file, a lock held too long, a
read-only folder) become `HistoryError`s that name the file and what to do; `recover` copies what is
readable from a damaged file into a new one.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from app.errors import HistoryDamaged, HistoryError
from app.paths import database_file, private_dir

STATUSES = ("complete", "streaming", "stopped", "blocked", "error", "interrupted")
UNCHECKED_MARK = "_[Not checked by Llama Guard from here on: the reply ended before its next check.]_"


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


def _m005_threads(db: sqlite3.Connection) -> None:
    """A reply's parent (the user message it answers; NULL before this: the message stored before it) and,
    for a reply shown before it was checked (fast mode), how many of its characters the passed checks
    covered (NULL: all of it, or not screened)."""
    db.execute("ALTER TABLE messages ADD COLUMN parent_id INTEGER")
    db.execute("ALTER TABLE messages ADD COLUMN checked_chars INTEGER")


def _m006_verdict_engine(db: sqlite3.Connection) -> None:
    """Where each verdict was computed: 'local', or the server that ran the guard (guard.remote); '' before this."""
    db.execute("ALTER TABLE verdicts ADD COLUMN engine TEXT NOT NULL DEFAULT ''")


MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = [
    ("001_initial", _m001_initial),
    ("002_search", _m002_search),
    ("003_verdict_precision", _m003_verdict_precision),
    ("004_writer_started", _m004_writer_started),
    ("005_threads", _m005_threads),
    ("006_verdict_engine", _m006_verdict_engine),
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
    parent_id: int | None = None  # a reply: the user message it answers
    checked_chars: int | None = None  # a reply shown before its checks: the part they passed

    @property
    def unchecked(self) -> str:
        """The end of a reply that was shown but never checked (fast mode, then stopped by an error or a
        kill); '' when all of it was checked or the guard was off."""
        if self.checked_chars is None or self.status == "blocked":
            return ""
        return self.content[self.checked_chars:]

    def marked_text(self) -> str:
        """The content, with the point from which it was never checked marked (see `unchecked`)."""
        if not self.unchecked:
            return self.content
        checked = self.content[: len(self.content) - len(self.unchecked)]
        return f"{checked}\n\n{UNCHECKED_MARK}\n\n{self.unchecked}"

    def to_dict(self) -> dict:
        return {"id": self.id, "role": self.role, "content": self.content, "status": self.status,
                "guarded": self.guarded, "stats": self.stats, "created_at": self.created_at, "verdicts": self.verdicts,
                "parent_id": self.parent_id, "checked_chars": self.checked_chars}


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
    """One SQLite database file. Safe to use from one thread at a time per instance.

    `read_only`: open for reading only (the reading commands): no write access needed, no lock taken, a
    file that does not exist yet reads as empty. A writable open of a file its owner made read-only, or in
    a folder that cannot be written, reads it and says why when asked to store."""

    def __init__(self, path: Path | None = None, *, read_only: bool = False):
        self.path = Path(path) if path else database_file()
        try:
            self._open(read_only)
        except OSError as e:
            raise HistoryError(f"The history file {self.path} cannot be used: {e.strerror or e}. Nothing was changed; "
                               "check the permissions of the file and its folders.", title="History unavailable") from None

    def _open(self, read_only: bool) -> None:
        self.read_only_reason = ""
        if read_only:
            self.read_only_reason = "opened for reading"
        elif self.path.exists() and not self.path.stat().st_mode & stat.S_IWUSR:
            self.read_only_reason = f"the file is read-only; to store chats again: chmod u+w {self.path}"
        elif self.path.exists() and not os.access(self.path.parent, os.W_OK):
            self.read_only_reason = f"its folder {self.path.parent} cannot be written"
        try:
            self.db = self._connect()
            if not self.read_only:
                if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self.db.execute("PRAGMA journal_mode=WAL")
                self.migrate()
                self.mark_interrupted()
        except sqlite3.Error as e:
            raise self.error(e) from None

    @property
    def read_only(self) -> bool:
        return bool(self.read_only_reason)

    def _connect(self, empty: bool = False) -> sqlite3.Connection:
        if empty or (self.read_only and not self.path.exists()):  # nothing stored yet: an empty history
            db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            db.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
            for _name, fn in MIGRATIONS:
                fn(db)
        else:
            if not self.read_only:
                private_dir(self.path.parent)
            old_umask = os.umask(0o077)  # the database, its WAL and shm files: owner only
            try:
                uri = self.path.resolve().as_uri() + ("?mode=ro" if self.read_only else "")
                db = sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None, check_same_thread=False)
                if self.read_only and not self._readable(db):
                    # WAL files cannot be made beside it (a read-only folder): read the file as it is
                    db = sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None, check_same_thread=False)
            finally:
                os.umask(old_umask)
            mode = self.path.stat().st_mode
            if not self.read_only and mode & 0o077:
                os.chmod(self.path, mode & 0o700)  # owner only; the owner's own bits as they were
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=10000")
        return db

    @staticmethod
    def _readable(db: sqlite3.Connection) -> bool:
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorname", "").startswith("SQLITE_CANTOPEN"):
                db.close()
                return False
            raise
        return True

    def error(self, e: sqlite3.Error) -> HistoryError:
        """What an SQLite failure means for the user: what happened to which file, and what to do."""
        name = getattr(e, "sqlite_errorname", "")
        where = f"The history file {self.path}"
        if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "malformed" in str(e) or "not a database" in str(e):
            return HistoryDamaged(
                f"{where} is damaged ({e}). It was left as it is. `llama-chat history recover` copies every "
                "conversation still readable into a new file and keeps the damaged one beside it.",
                title="History is damaged")
        if name.startswith("SQLITE_BUSY") or "locked" in str(e):
            return HistoryError(f"{where} is locked by another program (over 10 s): nothing was changed. Close "
                                "that program (or its open transaction) and try again.", title="History is busy")
        if name.startswith("SQLITE_READONLY") or name.startswith("SQLITE_CANTOPEN") or "readonly" in str(e):
            return HistoryError(f"{where} cannot be written or opened here ({e}): nothing was changed. Check the "
                                "permissions of the file and its folder.", title="History is read-only")
        if name.startswith("SQLITE_FULL"):
            return HistoryError(f"{where}: the disk is full, so nothing was stored. Free some space and try again.",
                                title="Disk full")
        return HistoryError(f"{where}: {e}. Nothing was changed.")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction, taking the write lock up front so two instances never deadlock."""
        if self.read_only:
            raise HistoryError(f"The history file {self.path} cannot be changed ({self.read_only_reason}), so "
                               "nothing was stored or changed; it was left as it is.", title="History is read-only")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- schema ----------------------------------------------------------------------------------
    def migrate(self, upto: str | None = None) -> list[str]:
        """Apply the migrations not yet recorded (up to and including `upto`); returns their names. An
        up-to-date file is only read."""
        names = [name for name, _ in MIGRATIONS]
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'migrations'").fetchone():
            done = {r[0] for r in self.db.execute("SELECT name FROM migrations")}
            if set(names[: names.index(upto) + 1 if upto else None]) <= done:
                return []
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
                    guarded: bool = True, parent_id: int | None = None) -> int:
        """`parent_id`: for a reply, the user message it answers."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        now = time.time()
        pid = os.getpid() if status == "streaming" else None
        with self.write() as db:
            cur = db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, guarded, writer_pid, writer_started,"
                " parent_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, role, content, status, int(guarded), pid, pid and process_start(pid), parent_id,
                 now, now),
            )
            self._touch(db, conversation_id)
            return cur.lastrowid

    def update_message(self, message_id: int, *, content: str | None = None, status: str | None = None,
                       stats: dict | None = None, checked_chars: int | None = None) -> None:
        sets, args = ["updated_at = ?"], [time.time()]
        if checked_chars is not None:
            sets.append("checked_chars = ?")
            args.append(checked_chars)
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
                " precision, engine, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (message_id, verdict.stage, int(verdict.safe), json.dumps(list(verdict.categories)), verdict.score,
                 verdict.latency_s, verdict.guard_model, verdict.reason, verdict.precision, verdict.engine, time.time()),
            )

    def last_message_id(self, conversation_id: int) -> int | None:
        return self.db.execute("SELECT max(id) FROM messages WHERE conversation_id = ?", (conversation_id,)).fetchone()[0]

    def messages(self, conversation_id: int) -> list[Message]:
        """A conversation's messages in thread order: each reply right after the message it answers (two
        writers' turns may have been stored interleaved)."""
        rows = self.db.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)).fetchall()
        keys = rows[0].keys() if rows else ()
        parent = (lambda r: r["parent_id"]) if "parent_id" in keys else (lambda r: None)  # a read-only older file
        rows.sort(key=lambda r: (parent(r), 1, r["id"]) if parent(r) else (r["id"], 0, r["id"]))
        verdicts: dict[int, list[dict]] = {}
        for v in self.db.execute(
            "SELECT v.* FROM verdicts v JOIN messages m ON m.id = v.message_id WHERE m.conversation_id = ? ORDER BY v.id",
            (conversation_id,),
        ):
            verdicts.setdefault(v["message_id"], []).append(self._verdict(v))
        def status(r) -> str:  # a read-only reader does not mark dead writers' replies; it reports them so
            started = r["writer_started"] if "writer_started" in keys else None
            dead = r["status"] == "streaming" and not _writer_alive(r["writer_pid"], started)
            return "interrupted" if dead else r["status"]

        return [
            Message(r["id"], r["conversation_id"], r["role"], r["content"], status(r), bool(r["guarded"]),
                    json.loads(r["stats"]) if r["stats"] else None, r["created_at"], verdicts.get(r["id"], []),
                    parent(r), r["checked_chars"] if "checked_chars" in keys else None)
            for r in rows
        ]

    @staticmethod
    def _verdict(v) -> dict:
        from guard.categories import display_name

        codes = json.loads(v["categories"])
        return {"stage": v["stage"], "safe": bool(v["safe"]), "categories": codes,
                "category_names": [display_name(c) for c in codes], "score": v["score"], "latency_s": v["latency_s"],
                "guard_model": v["guard_model"], "reason": v["reason"],
                # a read-only file may be older than these columns
                **{key: v[key] if key in v.keys() else "" for key in ("precision", "engine")}}

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


    def check(self) -> None:
        """Raise HistoryDamaged when SQLite's quick check finds damage anywhere in the file (it reads every
        page: tens of milliseconds for 100k messages), which plain use would only meet on the damaged page."""
        try:
            problems = [r[0] for r in self.db.execute("PRAGMA quick_check(5)")]
        except sqlite3.Error as e:
            raise self.error(e) from None
        if problems != ["ok"]:
            raise self.error(sqlite3.DatabaseError(f"database disk image is malformed: {problems[0]}"))

    @classmethod
    def scratch(cls, path: Path, reason: str) -> "History":
        """An empty history that stores nothing (each attempt says `reason`), for a window to open on when
        the file at `path` cannot be used."""
        h = cls.__new__(cls)
        h.path, h.read_only_reason = path, reason
        h.db = h._connect(empty=True)
        return h


def _translated(method):
    """`method` with SQLite's failures turned into the HistoryError that names the file and what to do."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise self.error(e) from None
    return run


for _name, _method in list(vars(History).items()):  # every public method reads or writes the file
    if callable(_method) and not _name.startswith("_") and _name not in ("write", "error", "scratch", "check"):
        setattr(History, _name, _translated(_method))


# -- recovery ------------------------------------------------------------------------------------
TABLES = ("conversations", "messages", "verdicts")
CHUNK = 256  # rows read at once while recovering; a damaged chunk is retried row by row


@dataclass
class Recovery:
    """What `recover` copied, per table, and where the files are now."""

    recovered: dict[str, int]
    unreadable: dict[str, int]  # row ids whose page could not be read
    placeholders: int  # conversations re-created (their own row was lost) for messages that survived
    path: Path
    damaged_copy: Path


def recover(path: Path) -> Recovery:
    """Copy every readable conversation, message and verdict of the damaged history at `path` into a new
    file, row by row where whole chunks fail. The new file takes the name; the original (with any WAL
    files) is renamed beside it, never deleted or changed."""
    path = Path(path)
    if not path.is_file():
        raise HistoryError(f"There is no history file at {path} to recover.")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    damaged_copy = path.with_name(f"{path.name}.damaged-{stamp}")
    fresh = path.with_name(f"{path.name}.recovered-{stamp}")
    header_copy = fresh.with_name(fresh.name + ".header")  # only made when the file's own header is gone
    src = _open_damaged(path, header_copy)
    target = History(fresh)
    recovered, unreadable, placeholders = {}, {}, 0
    try:
        with target.write() as db:
            for table in TABLES:
                want = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
                rows, unreadable[table] = _readable_rows(src, table, want)
                if table == "messages":  # messages whose conversation row was lost get a placeholder one
                    have = {r[0] for r in db.execute("SELECT id FROM conversations")}
                    for cid in sorted({r["conversation_id"] for r in rows} - have):
                        first = min((r for r in rows if r["conversation_id"] == cid), key=lambda r: r["id"])
                        db.execute("INSERT INTO conversations (id, title, created_at, updated_at) VALUES (?, ?, ?, ?)",
                                   (cid, f"Recovered conversation {cid}", first["created_at"], first["created_at"]))
                        placeholders += 1
                if table == "verdicts":  # a verdict whose message was lost has nothing to belong to
                    have = {r[0] for r in db.execute("SELECT id FROM messages")}
                    rows = [r for r in rows if r["message_id"] in have]
                for r in rows:
                    cols = [c for c in want if c in r.keys()]
                    db.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                               [r[c] for c in cols])
                recovered[table] = len(rows)
            db.execute("UPDATE messages SET status = 'interrupted', writer_pid = NULL WHERE status = 'streaming'")
    finally:
        src.close()
        target.close()
        header_copy.unlink(missing_ok=True)
    for suffix in ("", "-wal", "-shm"):  # the WAL files belong to the damaged file: they move with it
        if Path(f"{path}{suffix}").exists():
            os.rename(f"{path}{suffix}", f"{damaged_copy}{suffix}")
    os.rename(fresh, path)
    return Recovery(recovered, unreadable, placeholders, path, damaged_copy)


def _open_damaged(path: Path, header_copy: Path) -> sqlite3.Connection:
    """The damaged file, read-only; when its first 100 bytes (the header) are unreadable, a copy with a
    fresh header (a damaged file is never written)."""
    db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.DatabaseError:
        db.close()
    data = bytearray(path.read_bytes())
    for page_size in (4096, 1024, 2048, 8192, 16384, 32768, 65536):
        template = sqlite3.connect(":memory:")
        template.execute(f"PRAGMA page_size={page_size}")
        template.execute("CREATE TABLE t (x)")
        header = template.serialize()[:100]
        template.close()
        data[:100] = header
        data[28:32] = (0).to_bytes(4, "big")  # no page count: SQLite takes the file's size
        header_copy.write_bytes(data)
        db = sqlite3.connect(header_copy.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            if db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'messages'").fetchone()[0]:
                return db
        except sqlite3.DatabaseError:
            pass
        db.close()
    raise HistoryError(f"Nothing in {path} can be read as a llama-chat history (its schema is unreadable); "
                       "the file was left as it is.", title="History cannot be recovered")


def _readable_rows(src: sqlite3.Connection, table: str, columns: list[str]) -> tuple[list, int]:
    """Every row of `table` that can still be read, and how many row ids could not be."""
    try:
        have = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
    except sqlite3.DatabaseError:
        return [], 0
    cols = ", ".join(c for c in columns if c in have)
    top = 0
    for sql in (f"SELECT max(rowid) FROM {table}", "SELECT seq FROM sqlite_sequence WHERE name = ?"):
        try:
            top = max(top, (src.execute(sql, (table,) if "?" in sql else ()).fetchone() or [0])[0] or 0)
        except sqlite3.DatabaseError:
            pass
    rows, lost = [], 0
    for start in range(1, top + 1, CHUNK):
        try:
            rows += src.execute(f"SELECT {cols} FROM {table} WHERE rowid BETWEEN ? AND ?",
                                (start, start + CHUNK - 1)).fetchall()
            continue
        except sqlite3.DatabaseError:
            pass
        for rowid in range(start, min(start + CHUNK, top + 1)):
            try:
                rows += src.execute(f"SELECT {cols} FROM {table} WHERE rowid = ?", (rowid,)).fetchall()
            except sqlite3.DatabaseError:
                lost += 1
    return rows, lost


def to_markdown(conv: Conversation) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conv.created_at))
    out = [f"# {conv.title}", "", f"_{when} · {conv.model or 'model not recorded'}_", ""]
    if conv.system_prompt:
        out += ["> **System:** " + conv.system_prompt.replace("\n", "\n> "), ""]
    for m in conv.messages:
        who = "You" if m.role == "user" else "Assistant"
        badge = "" if m.status == "complete" else f" _({m.status})_"
        out += [f"## {who}{badge}", ""]
        out += ["_Blocked by Llama Guard; the text is kept in the database only._" if m.status == "blocked"
                else m.marked_text(), ""]
        for v in m.verdicts:
            mark = "passed" if v["safe"] else "blocked: " + (", ".join(v["category_names"]) or v["reason"])
            out.append(f"- Llama Guard ({v['stage']}): {mark}, score {v['score'] or 0:.2f}")
        if not m.guarded:
            out.append("- not screened (guard off)")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
