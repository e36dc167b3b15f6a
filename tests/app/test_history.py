"""History on a real SQLite file: schema, migrations, streaming writes, search, export, concurrency."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.errors import HistoryError
from app.history import MIGRATIONS, History
from bench.history import fill
from guard.verdict import Verdict


@pytest.fixture
def history(tmp_path):
    h = History(tmp_path / "h.sqlite3")
    yield h
    h.close()


def schema(path):
    db = sqlite3.connect(path)
    rows = db.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name").fetchall()
    db.close()
    return rows


def test_fresh_database_schema_mode_and_permissions(history):
    names = {name for _type, name in schema(history.path)}
    assert {"conversations", "messages", "verdicts", "migrations", "messages_fts",
            "messages_fts_insert", "messages_fts_delete", "messages_fts_update"} <= names
    applied = [r[0] for r in history.db.execute("SELECT name FROM migrations ORDER BY name")]
    assert applied == [name for name, _ in MIGRATIONS]
    assert history.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert stat.S_IMODE(os.stat(history.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(history.path.parent).st_mode) == 0o700


def test_upgrade_from_the_first_version_keeps_data_and_indexes_it(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    MIGRATIONS[0][1](db)
    db.execute("INSERT INTO migrations VALUES (?, 0)", (MIGRATIONS[0][0],))
    db.execute("INSERT INTO conversations VALUES (1, 'Old chat', '', 'm', 0, 0)")
    db.execute("INSERT INTO messages (conversation_id, role, content, status, created_at, updated_at)"
               " VALUES (1, 'user', 'sourdough starter question', 'complete', 0, 0)")
    db.commit()
    db.close()
    h = History(path)
    assert [r[0] for r in h.db.execute("SELECT name FROM migrations ORDER BY name")] == [n for n, _ in MIGRATIONS]
    assert h.search("sourdough")[0]["conversation_id"] == 1
    h.close()
    assert schema(path) == schema(History(tmp_path / "fresh.sqlite3").path)


def test_conversation_lifecycle_search_export_delete(history):
    cid = history.create_conversation("  How do I   bake bread?\n", system_prompt="Be brief.", model="tiny")
    u = history.add_message(cid, "user", "How do I bake bread?")
    history.add_verdict(u, Verdict(True, score=0.01, stage="input", latency_s=0.2, guard_model="g"))
    a = history.add_message(cid, "assistant", "", status="streaming")
    history.update_message(a, content="Mix flour and water.", status="complete", stats={"new_tokens": 5})
    conv = history.get_conversation(cid)
    assert conv.title == "How do I bake bread?" and conv.system_prompt == "Be brief."
    assert [(m.role, m.status) for m in conv.messages] == [("user", "complete"), ("assistant", "complete")]
    assert conv.messages[0].verdicts[0]["safe"] and conv.messages[1].stats == {"new_tokens": 5}
    assert history.search("flour")[0]["conversation_id"] == cid
    assert history.search('flour" OR "x') == []  # FTS syntax is taken literally
    data = json.loads(history.export(cid, "json"))
    assert data["messages"][0]["verdicts"][0]["guard_model"] == "g"
    md = history.export(cid, "md")
    assert md.startswith("# How do I bake bread?") and "Llama Guard (input): passed" in md
    history.update_conversation(cid, title="Bread")
    assert history.list_conversations()[0].title == "Bread"
    history.delete_conversation(cid)
    assert history.search("flour") == [] and history.list_conversations() == []
    assert history.db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 0
    with pytest.raises(HistoryError, match="No conversation with id"):
        history.get_conversation(cid)


def test_blocked_text_stays_out_of_markdown_export(history):
    cid = history.create_conversation("x")
    m = history.add_message(cid, "assistant", "dangerous details", status="blocked")
    history.add_verdict(m, Verdict(False, ("S1",), ("Violent Crimes",), 0.9, stage="output"))
    md = history.export(cid, "md")
    assert "dangerous details" not in md and "blocked: Violent Crimes" in md


def test_streaming_reply_of_a_dead_process_is_marked_interrupted(tmp_path):
    path = tmp_path / "h.sqlite3"
    code = (
        "import os, sys; from app.history import History; h = History(sys.argv[1]);"
        "c = h.create_conversation('q'); h.add_message(c, 'user', 'question');"
        "m = h.add_message(c, 'assistant', '', status='streaming'); h.update_message(m, content='partial ans');"
        "os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    h = History(path)
    msgs = h.get_conversation(1).messages
    assert [(m.content, m.status) for m in msgs] == [("question", "complete"), ("partial ans", "interrupted")]


def test_a_live_writer_is_not_marked_interrupted(history, tmp_path):
    cid = history.create_conversation("q")
    m = history.add_message(cid, "assistant", "", status="streaming")  # this process is alive
    other = History(history.path)
    assert other.get_conversation(cid).messages[0].status == "streaming"
    assert m


WRITER = """
import sys
import time
from app.history import History
h = History(sys.argv[1])
cid = h.create_conversation("writer " + sys.argv[2])
for i in range(int(sys.argv[3])):
    m = h.add_message(cid, "user", f"message {sys.argv[2]}-{i}")
    h.update_message(m, content=f"message {sys.argv[2]}-{i} edited")
"""


def test_two_instances_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "shared.sqlite3"
    History(path).close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(k), "150"]) for k in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    h = History(path)
    assert h.db.execute("SELECT COUNT(*) FROM messages WHERE content LIKE '% edited'").fetchone()[0] == 300
    assert len(h.search("edited", limit=500)) == 2
    assert h.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.slow
def test_search_returns_every_matching_conversation_at_scale(tmp_path):
    h = History(tmp_path / "h.sqlite3")
    want = fill(h, 1000, 100, 2)  # 100k messages, 500 conversations mention Paris
    hits = h.search("paris")
    assert {x["conversation_id"] for x in hits} == want and len(hits) == len(want)  # one row each, none missing
    assert all("[Paris]" in x["snippet"] for x in hits)
    pages = [h.search("paris", limit=200, offset=o) for o in (0, 200, 400)]
    assert [len(p) for p in pages] == [200, 200, 100] and sum(pages, []) == hits  # pages in the same order


def test_search_matches_word_prefixes(tmp_path):
    h = History(tmp_path / "h.sqlite3")
    want = fill(h, 6, 4, 3)
    assert {x["conversation_id"] for x in h.search("Pari")} == want
    assert {x["conversation_id"] for x in h.search("capital fra")} == want  # every word, each a prefix
    assert h.search("Parisian") == []


def test_a_read_only_history_file_is_read_never_changed():
    from app.paths import database_file

    path = database_file()
    h = History(path)
    cid = h.create_conversation("Paris trip")
    h.add_message(cid, "user", "What to see in Paris?")
    h.close()
    os.chmod(path, 0o400)
    before = path.read_bytes()
    ro = History(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o400  # not set back to 0600
    assert [c.title for c in ro.list_conversations()] == ["Paris trip"] and ro.search("paris")
    with pytest.raises(HistoryError, match=r"cannot be changed \(the file is read-only") as e:
        ro.add_message(cid, "user", "more")
    assert f"chmod u+w {path}" in e.value.message
    ro.close()
    assert path.read_bytes() == before
    r = subprocess.run([sys.executable, "-m", "app.cli", "history", "list"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Paris trip" in r.stdout and path.read_bytes() == before


def test_a_reused_writer_pid_does_not_keep_a_reply_streaming(tmp_path):
    h = History(tmp_path / "h.sqlite3")
    cid = h.create_conversation("x")
    dead = h.add_message(cid, "assistant", "partial", status="streaming")
    with h.write() as db:  # its writer died and this live process now has that pid
        db.execute("UPDATE messages SET writer_started = writer_started - 1 WHERE id = ?", (dead,))
    h.add_message(cid, "assistant", "still writing", status="streaming")  # this process writes it
    assert [m.status for m in History(h.path).messages(cid)] == ["interrupted", "streaming"]


# -- damage, locks and permissions (issue 20, item 4) --------------------------------------------------
def filled_history(path, conversations=30, per_conversation=20) -> dict[int, list[tuple]]:
    """A history of long-ish messages; returns each conversation's (role, content) rows."""
    h = History(path)
    want = {}
    for c in range(conversations):
        cid = h.create_conversation(f"chat {c}")
        want[cid] = []
        for i in range(per_conversation):
            role, text = ("user" if i % 2 == 0 else "assistant"), f"conversation {c} message {i} " + "lorem ipsum " * 20
            m = h.add_message(cid, role, text)
            h.add_verdict(m, Verdict(True, score=0.01, stage="input" if role == "user" else "output"))
            want[cid].append((role, text))
    h.close()
    return want


def damage(path, kind: str) -> int | None:
    """Damage `path` as a disk or a careless program would; returns the page overwritten, if one was."""
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "zeroed-header":
        path.write_bytes(bytes(100) + data[100:])
    elif kind == "text":
        path.write_text("these are my notes, not a database\n" * 50)
    else:  # a 4 KB page in the middle of the messages table overwritten with garbage
        db = sqlite3.connect(path)
        pages = [r[0] for r in db.execute("SELECT pageno FROM dbstat WHERE name = 'messages' AND pagetype = 'leaf'"
                                          " ORDER BY pageno")]
        db.close()
        page = pages[len(pages) // 2]
        with open(path, "r+b") as f:
            f.seek((page - 1) * 4096)
            f.write(os.urandom(4096))
        return page
    return None


def cli(*args, user=None):
    cmd = [sys.executable, "-m", "app.cli", *args]
    if user == "other" and os.geteuid() == 0:  # root may write anywhere: read as an unprivileged user
        cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", ["truncated", "page", "zeroed-header", "text"])
def test_a_damaged_history_is_named_left_unchanged_and_recovery_is_offered(kind):
    from app.paths import database_file

    path = database_file()
    filled_history(path)
    damage(path, kind)
    before = path.read_bytes()
    failures = 0
    for args in (["history", "list"], ["history", "show", "15"], ["history", "search", "lorem"],
                 ["history", "export", "15"], ["history", "delete", "15"]):
        r = cli(*args)
        assert "unexpected error" not in r.stderr and "Traceback" not in r.stderr
        if r.returncode:
            failures += 1
            assert r.returncode == 1 and str(path) in r.stderr and "llama-chat history recover" in r.stderr
    assert failures  # every kind of damage shows somewhere
    assert path.read_bytes() == before
    with pytest.raises(HistoryError, match="is damaged"):
        History(path).check() if kind in ("page", "truncated") else History(path)


@pytest.mark.parametrize("kind", ["page", "zeroed-header", "truncated"])
def test_recover_copies_every_intact_conversation_and_keeps_the_original(kind):
    from app.history import recover
    from app.paths import database_file

    path = database_file()
    want = filled_history(path)
    damage(path, kind)
    damaged = path.read_bytes()
    r = cli("history", "recover")
    assert r.returncode == 0, r.stderr
    kept = [p for p in path.parent.iterdir() if ".damaged-" in p.name and not p.name.endswith(("-wal", "-shm"))]
    assert len(kept) == 1 and kept[0].read_bytes() == damaged and str(kept[0]) in r.stdout
    h = History(path)
    h.check()  # the new file is whole
    got = {c.id: [(m.role, m.content) for m in h.messages(c.id)] for c in h.list_conversations()}
    intact = [cid for cid in want if got.get(cid) == want[cid]]
    lost = sum(len(set(want[cid]) - set(got.get(cid, []))) for cid in want)
    if kind == "zeroed-header":
        assert len(intact) == 30 and lost == 0
    elif kind == "page":  # one leaf page of messages is gone: at most its rows, every other conversation whole
        assert 0 < lost <= 12 and len(intact) >= 30 - lost and len(got) == 30
    else:  # the last third of the file is gone
        assert 0 < len(intact) < 30
    assert f"{h.db.execute('SELECT count(*) FROM messages').fetchone()[0]} messages" in r.stdout
    if kind != "truncated":  # (there, verdict pages went too)
        assert all(m.verdicts for cid in got for m in h.messages(cid))  # verdicts came with their messages
    assert len(h.search("lorem")) == sum(bool(m) for m in got.values()) > 0  # the search index was rebuilt
    h.close()
    with pytest.raises(HistoryError, match="no history file"):
        recover(path.with_name("missing.sqlite3"))


def test_reading_needs_no_write_access_and_no_lock(monkeypatch):
    import tempfile

    from app.paths import database_file

    home = Path(tempfile.mkdtemp(prefix="llama-chat-shared-"))  # outside pytest's owner-only folders
    monkeypatch.setenv("LLAMA_CHAT_HOME", str(home))
    path = database_file()
    filled_history(path, conversations=3, per_conversation=2)
    # Another program holds the write lock: reading commands do not wait for it.
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], "
                               "isolation_level=None); db.execute('BEGIN IMMEDIATE'); print('locked', flush=True); "
                               "time.sleep(60)", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = cli("history", "list")
        assert r.returncode == 0 and "chat 2" in r.stdout, r.stderr
    finally:
        holder.kill()
        holder.wait()
    # A folder and file others may read but not write (root is made such a user for this).
    os.chmod(path, 0o444)
    for folder in (path.parent, home):
        os.chmod(folder, 0o555 if os.geteuid() else 0o755)
    before = path.read_bytes()
    try:
        for args in (["history", "list"], ["history", "show", "1"], ["history", "search", "lorem"]):
            r = cli(*args, user="other")
            assert r.returncode == 0 and "chat 0" in r.stdout, r.stderr
        r = cli("history", "delete", "1", user="other")
        assert r.returncode == 1 and "cannot be changed" in r.stderr and "Traceback" not in r.stderr
        os.chmod(path, 0o400)  # a file this user may not even read: named, no traceback
        r = cli("history", "list", user="other")
        assert r.returncode == 1 and f"{path} cannot be" in r.stderr and "permissions" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "unexpected" not in r.stderr
    finally:
        for folder in (path.parent, home):
            os.chmod(folder, 0o700)
    assert path.read_bytes() == before and stat.S_IMODE(path.stat().st_mode) == 0o400
    shutil.rmtree(home)


TURN = """
import sqlite3, sys, time
from app.config import Config
from app.history import History
from app.session import ChatSession, Engine
from tests.helpers.scripted import ScriptedGuard, ScriptedRunner

path, cid, text, wait_sql, wait_for = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])

class Waiting(ScriptedGuard):  # the input check ends once the other process got as far as the race needs
    def check(self, messages, *, stage=None, cancel=None):
        if stage == "input":
            db = sqlite3.connect(path)
            while db.execute(wait_sql, (cid,)).fetchone()[0] < wait_for:
                time.sleep(0.02)
            db.close()
        return super().check(messages, stage=stage)

session = ChatSession(History(path), Config(), Engine(ScriptedRunner(reply=f"Reply to {text}"), Waiting(), "x"))
session.open(cid)
for event in session.send(text):
    pass
"""


def test_two_processes_continuing_one_conversation_keep_each_answer_with_its_question(tmp_path):
    """Issue 20, item 2, with real processes: both store their message before either reply (the order
    `You A, You B, Assistant(A), Assistant(B)`); each reply is still paired with its own question."""
    from app.config import Config
    from app.session import ChatSession

    path = tmp_path / "h.sqlite3"
    h = History(path)
    cid = h.create_conversation("shared")
    q = h.add_message(cid, "user", "First question")
    h.add_message(cid, "assistant", "First answer", parent_id=q)
    users = "SELECT count(*) FROM messages WHERE conversation_id = ? AND role = 'user'"
    replies = "SELECT count(*) FROM messages WHERE conversation_id = ? AND role = 'assistant'"
    a = subprocess.Popen([sys.executable, "-c", TURN, str(path), str(cid), "Question A", users, "3"])
    while h.db.execute(users, (cid,)).fetchone()[0] < 2:  # A's message is stored first
        assert a.poll() is None, "the first process ended before storing its message"
        time.sleep(0.05)
    b = subprocess.Popen([sys.executable, "-c", TURN, str(path), str(cid), "Question B", replies, "2"])
    assert a.wait(timeout=120) == 0 and b.wait(timeout=120) == 0
    stored = [r[0] for r in h.db.execute("SELECT content FROM messages ORDER BY id")]
    assert stored[2:] == ["Question A", "Question B", "Reply to Question A", "Reply to Question B"]  # the race
    context = ChatSession(h, Config()).context(h.messages(cid))
    assert [m["content"] for m in context] == ["First question", "First answer", "Question A", "Reply to Question A",
                                               "Question B", "Reply to Question B"]
    h.close()
