"""One chat turn: the user's message is stored and screened, the model answers while the reply is
screened as it streams, and everything (text, status, stats, every verdict) is stored.

The session yields typed events for the UI and the CLI. What the guard blocks is shown as a refusal
and never re-enters the model's context: the context holds only exchanges whose message passed and
whose reply completed (or was stopped) and passed.
"""

from __future__ import annotations

import datetime as _dt
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Iterator

from app.config import Config
from app.errors import SessionError
from app.engine import Engine
from app.history import History, Message
from app.workspace import Workspace, open_histories
from guard.moderator import CheckCancelled

WRITE_INTERVAL_S = 1.0  # how often a streaming reply is written to the database (each write reindexes it for search)
GUARD_SHARE = 0.1  # the part of a streaming reply's time its checks aim to take (guard.stream)


# -- events --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UserStored:
    message_id: int
    text: str


@dataclass(frozen=True)
class Screened:
    """A guard verdict on a stored message: the input check, and each check of the reply as it is stored."""

    message_id: int
    verdict: object


@dataclass(frozen=True)
class Changed:
    """The conversation gained turns elsewhere (another window, `ask --conversation`) since this session
    last read it; the new turn continues from the latest stored one."""

    conversation_id: int
    latest: int  # the newest message stored before this turn
    message: str = ("This conversation changed elsewhere (another window or `llama-chat ask`); continuing "
                    "from the latest turn.")


@dataclass(frozen=True)
class Released:
    """Reply text that may be shown (it passed the guard, or the guard is off)."""

    text: str


@dataclass(frozen=True)
class Retracted:
    """Fast mode: the reply shown so far failed a check; show the refusal instead."""

    message_id: int
    verdict: object


@dataclass(frozen=True)
class Blocked:
    stage: str  # input or output
    message_id: int
    verdict: object


@dataclass(frozen=True)
class Done:
    message_id: int | None  # the reply's id (None when the input was blocked)
    status: str  # complete, stopped, blocked, error
    text: str = ""
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Error:
    error: Exception

    @property
    def message(self) -> str:
        return getattr(self.error, "message", None) or f"{type(self.error).__name__}: {self.error}"


def refusal(verdict) -> str:
    """What the user sees in place of blocked text."""
    names = ", ".join(getattr(verdict, "category_names", ()) or ())
    why = names or getattr(verdict, "reason", "") or "unsafe content"
    return f"Blocked by Llama Guard ({why})."


# -- the session ---------------------------------------------------------------------------------
class ChatSession(Workspace):
    """The open conversation, its history and the engine that answers it."""

    def __init__(self, history: History, config: Config, engine: Engine | None = None, *,
                 browse: History | None = None):
        self.history, self.config, self.engine = history, config, engine
        self.browse = browse or history  # the connection the UI thread reads and edits on (app.workspace)
        self.conversation_id: int | None = None
        self.system_prompt = config.preset(config.prompts.default) if config.prompts.default else ""
        self._busy = threading.Lock()
        self._seen: int | None = None  # the newest message id of the open conversation this session knows
        self.checking: str | None = None  # the stage of the guard check running now, if one is (`live`)

    @classmethod
    def start(cls, config: Config) -> "ChatSession":
        """The app's session: the history checked, a connection for turns and one for the UI thread; a damaged
        file is left alone (`history_problem`; `recover_history`)."""
        history, browse, problem = open_histories()
        session = cls(history, config, browse=browse)
        session.history_problem = problem
        return session

    @property
    def guarded(self) -> bool:
        return self.engine is not None and self.engine.guard is not None

    # -- conversations ---------------------------------------------------------------------------
    def new_conversation(self, system_prompt: str | None = None) -> None:
        """Start afresh; the conversation is stored with its first message."""
        self.conversation_id, self._seen = None, None
        if system_prompt is not None:
            self.system_prompt = system_prompt
        if self.engine:
            self.engine.runner.reset()

    def open(self, conversation_id: int):
        conv = self.history.get_conversation(conversation_id)
        self.conversation_id, self.system_prompt = conv.id, conv.system_prompt
        self._seen = max((m.id for m in conv.messages), default=None)
        if self.engine:
            self.engine.runner.reset()
        return conv

    def set_system_prompt(self, text: str) -> None:
        self.system_prompt = text
        if self.conversation_id is not None:
            self.history.update_conversation(self.conversation_id, system_prompt=text)

    def messages(self) -> list[Message]:
        return self.history.messages(self.conversation_id) if self.conversation_id is not None else []

    def context(self, messages: list[Message] | None = None) -> list[dict]:
        """The exchanges the model and the guard may see: a passed user message and the reply to it (its
        parent; in files from before parents, the message stored before it) that completed or was
        stopped. Blocked, failed or interrupted turns are left out."""
        msgs = self.messages() if messages is None else messages
        by_id, out = {m.id: m for m in msgs}, []
        for before, reply in zip([None] + msgs, msgs):
            user = by_id.get(reply.parent_id) if reply.parent_id else before
            if reply.role == "assistant" and reply.status in ("complete", "stopped") and user is not None \
                    and user.role == "user" and user.status == "complete":
                out += [{"role": "user", "content": user.content}, {"role": "assistant", "content": reply.content}]
        return out

    def _model_messages(self, exchange: list[dict]) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + exchange

    def live(self) -> dict:
        """The running turn's figures so far (the runner's stats, updated as it decodes) and the stage of the
        guard check running now ('checking': input, output or None), for a status bar."""
        stats = getattr(self.engine.runner, "last_stats", None) if self.engine else None
        return {**(stats.to_dict() if stats else {}), "checking": self.checking}

    def _check(self, messages, **kw):
        """A guard check, noted in `checking` while it runs."""
        self.checking = kw.get("stage")
        try:
            return self.engine.guard.check(messages, **kw)
        finally:
            self.checking = None

    # -- turns -----------------------------------------------------------------------------------
    def send(self, text: str, *, cancel: threading.Event | None = None) -> Iterator:
        """Store, screen and answer `text`."""
        if not text.strip():
            raise SessionError("The message is empty.")
        self._require_engine()
        with self._busy:
            if self.conversation_id is not None:
                latest = self.history.last_message_id(self.conversation_id)
                if latest is not None and (self._seen is None or latest > self._seen):
                    yield Changed(self.conversation_id, latest)
            exchange = self.context() + [{"role": "user", "content": text}]
            # A message the model cannot take is refused before it is stored or screened (a 1 MB message
            # took the guard 92 windows before the runner refused it).
            self.engine.runner.fit(self._model_messages(exchange), date=_dt.date.today(),
                                   max_new_tokens=self.config.generation.max_new_tokens)
            if self.conversation_id is None:
                self.conversation_id = self.history.create_conversation(
                    text, system_prompt=self.system_prompt, model=self.engine.model_name)
            user_id = self.history.add_message(self.conversation_id, "user", text, status="streaming",
                                               guarded=self.guarded)
            self._seen = user_id
            yield UserStored(user_id, text)
            if self.guarded:
                try:
                    verdict = self._check(exchange, stage="input", cancel=cancel)
                except CheckCancelled:  # not screened, so not sent: kept, marked stopped, never in context
                    self.history.update_message(user_id, status="stopped")
                    yield Done(None, "stopped")
                    return
                self.history.add_verdict(user_id, verdict)
                yield Screened(user_id, verdict)
                if not verdict.safe:
                    self.history.update_message(user_id, status="blocked")
                    yield Blocked("input", user_id, verdict)
                    yield Done(None, "blocked")
                    return
            self.history.update_message(user_id, status="complete")
            yield from self._reply(exchange, cancel, user_id)

    def regenerate(self, *, cancel: threading.Event | None = None) -> Iterator:
        """Replace the last reply with a new one (the user's message was already screened)."""
        self._require_engine()
        with self._busy:
            msgs = self.messages()
            if msgs and msgs[-1].role == "assistant":
                self.history.delete_messages_from(msgs[-1].id)
                msgs = msgs[:-1]
            if not msgs or msgs[-1].role != "user" or msgs[-1].status != "complete":
                raise SessionError("There is no answered message to regenerate.")
            exchange = self.context(msgs) + [{"role": "user", "content": msgs[-1].content}]
            yield from self._reply(exchange, cancel, msgs[-1].id)

    def edit(self, message_id: int, text: str, *, cancel: threading.Event | None = None) -> Iterator:
        """Replace an earlier user message (and everything after it) and continue from there."""
        msgs = {m.id: m for m in self.messages()}
        if message_id not in msgs or msgs[message_id].role != "user":
            raise SessionError("Only your own messages in the open conversation can be edited.")
        self.history.delete_messages_from(message_id)
        yield from self.send(text, cancel=cancel)

    def _require_engine(self) -> None:
        if self.engine is None:
            raise SessionError("The model is not loaded yet.")

    def _reply(self, exchange: list[dict], cancel: threading.Event | None, parent_id: int) -> Iterator:
        from guard.stream import Block, Release, Retract, StreamModerator
        from model.sampling import Sampling

        runner, guard, g = self.engine.runner, self.engine.guard, self.config.guard
        gen = self.config.generation
        sampling = Sampling(gen.temperature, gen.top_p, None, gen.seed, gen.max_new_tokens, gen.repetition_penalty)
        reply_id = self.history.add_message(self.conversation_id, "assistant", "", status="streaming",
                                            guarded=self.guarded, parent_id=parent_id)
        self._seen = reply_id
        watched = SimpleNamespace(check=self._check)  # the guard, as the moderator calls it
        moderator = StreamModerator(watched, exchange, mode=g.mode, check_every=g.check_every,
                                    guard_share=GUARD_SHARE) if guard else None
        generated, shown, last_write, failed, stored = "", "", time.monotonic(), None, 0

        def handle(events):
            nonlocal shown, failed, stored
            for v in moderator.verdicts[stored:] if moderator else ():  # as each check is made: a killed
                self.history.add_verdict(reply_id, v)  # process leaves the checks of what it showed
                yield Screened(reply_id, v)
            if moderator and len(moderator.verdicts) > stored and moderator.mode == "fast":
                # shown before checked: the stored reply says how much of it its checks passed
                self.history.update_message(reply_id, content=moderator.text[:moderator.released],
                                            checked_chars=moderator.checked)
            stored = len(moderator.verdicts) if moderator else 0
            for e in events:
                if isinstance(e, Release):
                    shown += e.text
                    yield Released(e.text)
                elif isinstance(e, (Retract, Block)):
                    failed = e.verdict
                    yield Retracted(reply_id, e.verdict) if isinstance(e, Retract) else Blocked("output", reply_id, e.verdict)

        try:
            stream = runner.stream(self._model_messages(exchange), sampling=sampling, cancel=cancel)
            for delta in stream:
                generated += delta
                yield from handle(moderator.feed(delta) if moderator else [Release(delta)])
                if failed is not None:
                    stream.close()  # stop generating: the rest would be blocked anyway
                    break
                if time.monotonic() - last_write >= WRITE_INTERVAL_S:
                    self.history.update_message(reply_id, content=shown)
                    last_write = time.monotonic()
            if moderator and failed is None:
                yield from handle(moderator.finish())
        except Exception as e:  # the reply so far is kept, marked error; what was shown unchecked is checked now
            if moderator and failed is None and moderator.mode == "fast":
                yield from handle(moderator.finish())
            yield Error(e)
            if failed is not None:  # retracted: kept for audit, never shown or sent to the model again
                self.history.update_message(reply_id, content=generated, status="blocked")
                yield Done(reply_id, "blocked")
                return
            stats = runner.last_stats.to_dict() if runner.last_stats else {}  # what answered, how far it got
            self.history.update_message(reply_id, content=shown, status="error", stats=stats)
            yield Done(reply_id, "error", shown, stats)
            return
        stats = runner.last_stats.to_dict() if runner.last_stats else {}
        if moderator and moderator.verdicts:
            stats["guard_s"] = round(sum(v.latency_s for v in moderator.verdicts), 4)
        if failed is not None:
            status, content = "blocked", generated  # kept for audit; never shown or sent to the model again
        else:
            status = "stopped" if stats.get("stop_reason") == "cancelled" else "complete"
            content = generated
        self.history.update_message(reply_id, content=content, status=status, stats=stats)
        yield Done(reply_id, status, "" if failed is not None else content, stats)
