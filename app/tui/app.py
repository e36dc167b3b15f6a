"""The llama-chat terminal app.

Models load in a worker while the window is already usable (history, settings, About). Each turn runs
in a worker that only posts messages; the handlers here own the widgets. The app talks to the chat
session only, never to the model or the guard.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Footer, Input, Static
from textual.worker import Worker, WorkerState

from app.config import Config
from app.errors import LlamaChatError
from app.session import (Blocked, Changed, ChatSession, Done, Engine, Error, Released, Retracted, Screened, UserStored,
                         refusal)
from app.tui.clipboard import copy_text
from app.tui.conversations import ConversationList, ConversationsMixin
from app.tui.dialogs import DialogsMixin
from app.tui.screens import ConfirmScreen, FirstRunScreen, VerdictScreen
from app.tui.widgets import MessageView, PromptArea, StatusBar, Transcript

FRAME_S = 1 / 30  # how often streamed text reaches the screen, at most
MAX_FRAME_S = 1.0  # ... and at least
UI_SHARE_CPU = 0.05  # the UI thread's CPU share (of one core) a reply's frames aim at when the model computes
UI_SHARE_OTHER = 0.5  # on the CPU, and elsewhere (GPU, remote)
LIVE_S = 0.5  # while a reply runs the status bar refreshes with each frame, and at least this often (live_status)
QUIT_WAIT_S = 3.0  # how long quitting waits for a stopped reply to be stored
CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)


class TurnEvent(Message):
    def __init__(self, event):
        super().__init__()
        self.event = event


class EngineReady(Message):
    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine


class LoadProgress(Message):
    def __init__(self, text: str):
        super().__init__()
        self.text = text


class DetachedExecutor(ThreadPoolExecutor):
    """Runs each thread worker (model load, turn, download) on a daemon thread that nobody joins: quitting
    never waits for one (asyncio's default executor is joined when the event loop closes, so Ctrl+Q
    waited for a load or a long check). `llama-chat` then ends the process (model.compiled.exit_process).
    A ThreadPoolExecutor only because asyncio accepts no other kind; its pool is never used."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:
                    future.set_exception(e)

        threading.Thread(target=run, daemon=True, name="llama-chat-worker").start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass  # nothing to join


def short_name(source: str) -> str:
    """'meta-llama/Llama-3.2-1B-Instruct' -> 'Llama-3.2-1B-Instruct'; a path -> its last part."""
    name = source.rstrip("/").split("/")[-1]
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def load_engine(config: Config, *, demo: bool, progress) -> Engine:
    return Engine.load(config, use_guard=config.guard.enabled, demo=demo, progress=progress, interactive=True)


class LlamaChatApp(ConversationsMixin, DialogsMixin, App):
    CSS_PATH = Path(__file__).parent / "app.tcss"  # absolute: subclasses elsewhere find it too
    TITLE = "llama-chat"
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+e", "edit_last", "Edit", priority=True),  # over the prompt's end-of-line (End does that)
        Binding("ctrl+n", "new_chat", "New"),
        Binding("ctrl+s", "system_prompt", "System"),
        Binding("f2", "settings", "Settings"),
        Binding("ctrl+b", "toggle_sidebar", "Chats"),
        Binding("ctrl+f", "search", "Search", show=False),
        Binding("ctrl+g", "verdicts", "Verdicts"),
        Binding("f1", "about", "About"),
    ]

    def __init__(self, config: Config, *, demo: bool = False, engine_loader=load_engine, animate: bool = True):
        super().__init__()
        self.config, self.demo, self.engine_loader, self.animate = config, demo, engine_loader, animate
        self.session = ChatSession.start(config)
        self.cancel = threading.Event()
        self.guard_state = "loading" if config.guard.enabled else "off"
        self.loading_text = "loading…"
        self.busy = False
        self.editing: int | None = None
        self.reply_view: MessageView | None = None
        self.user_view: MessageView | None = None
        self._stream = None
        self._stats: dict = {}
        self._pending_text = ""
        self.queued: str | None = None  # a message waiting for the models or the running reply (queue)
        self.loaded_sources: list[str] = []  # models that loaded in this run, offered again in F2
        self._turn: Worker | None = None
        self._live = None  # the status bar's refresh timer while a turn runs
        self._frame_status_at = 0.0  # when a frame last refreshed the status bar (time.monotonic)
        self.frame_s = FRAME_S  # the interval the turn worker hands text on at (see pace_frames)
        self._frame_mark: tuple[float, float] | None = None

    # -- layout ----------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static("", id="banner")
        with Horizontal(id="main"):
            with Vertical(id="sidebar"):
                yield Input(placeholder="Search chats", id="search")
                yield ConversationList(id="conversations")
            with Vertical(id="chat"):
                yield Transcript(id="transcript")
                prompt = PromptArea(id="prompt", placeholder="Message (Enter sends, Ctrl+J new line)")
                prompt.cursor_blink = self.animate
                yield prompt
        yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        asyncio.get_running_loop().set_default_executor(DetachedExecutor())
        self.query_one("#transcript", VerticalScroll).anchor()
        self.refresh_banner()
        self.refresh_status()
        self.refresh_conversations()
        self.query_one("#prompt", PromptArea).focus()
        if self.session.model_problem() and not self.demo:
            self.loading_text = "no model yet"
            self.refresh_status()
            self.push_screen(FirstRunScreen(self.config.model.source, self.config.guard.source,
                                            self.session.demo_available()), self.first_run_choice)
        else:
            self.load_models()
        if self.session.history_problem is not None:
            self.offer_recovery()
        elif self.session.read_only:
            self.notify(f"History is read-only: {self.session.read_only}. Chats in this window are not stored.",
                        severity="warning", timeout=20)

    # -- history ---------------------------------------------------------------------------------
    def offer_recovery(self) -> None:
        def chosen(yes) -> None:
            if not yes:
                self.notify("Nothing in this window is stored until the history is recovered.", severity="warning",
                            timeout=15)
                return
            try:
                r = self.session.recover_history()
            except LlamaChatError as e:
                self.notify(e.message, title=e.title, severity="error", timeout=30)
                return
            self.refresh_conversations()
            self.notify(f"Recovered {r.recovered['conversations']} conversations and {r.recovered['messages']} "
                        f"messages; the damaged file is kept at {r.damaged_copy}.", timeout=15)

        self.push_screen(ConfirmScreen(f"{self.session.history_problem.message}\n\nRecover it now? What is readable is copied "
                                       "into a new file; the damaged one is kept beside it.", confirm="Recover"),
                         chosen)

    # -- loading ---------------------------------------------------------------------------------
    def first_run_choice(self, choice) -> None:
        if choice == "demo":
            self.demo = True
            self.session.use_demo()
            self.guard_state = "off"
            self.refresh_banner()
            self.load_models()
        elif choice == "download":
            self.download_models()
        else:
            self.exit()

    @work(thread=True, exclusive=True, exit_on_error=False, group="load")
    def download_models(self) -> None:
        self.session.download(progress=lambda text: self.post_message(LoadProgress(text)))
        self.post_message(LoadProgress("download complete"))
        engine = self.engine_loader(self.config, demo=self.demo, progress=lambda t: self.post_message(LoadProgress(t)))
        self.post_message(EngineReady(engine))

    @work(thread=True, exclusive=True, exit_on_error=False, group="load")
    def load_models(self) -> None:
        engine = self.engine_loader(self.config, demo=self.demo, progress=lambda t: self.post_message(LoadProgress(t)))
        self.post_message(EngineReady(engine))

    def on_load_progress(self, message: LoadProgress) -> None:
        self.loading_text = message.text
        self.refresh_status()

    def on_engine_ready(self, message: EngineReady) -> None:
        notes = self.session.attach(message.engine)
        if self.config.model.source not in self.loaded_sources:
            self.loaded_sources.append(self.config.model.source)
        self.guard_state = self.session.describe()["guard"]
        self.loading_text = ""
        self.refresh_banner()
        self.refresh_status()
        self.notify(f"{short_name(self.session.describe()['model'])} is ready.", timeout=3)
        self.call_later(self.send_queued)
        for note in notes:
            self.notify(note, severity="warning", timeout=15)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state != WorkerState.ERROR:
            return
        error = event.worker.error
        text = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
        if event.worker.group == "load":
            self.guard_state = "error" if self.config.guard.enabled else self.guard_state
            self.loading_text = "not loaded"
            self.refresh_status()
            self.unqueue("The models did not load, so your message was not sent; it is back in the box.")
            if event.worker.name == "download_models":  # offline, or no access: try again, or the demo
                self.push_screen(FirstRunScreen(self.config.model.source, self.config.guard.source,
                                                self.session.demo_available(), problem=f"The download failed: {text}"),
                                 self.first_run_choice)
                return
            self.notify(text, title=getattr(error, "title", "Could not load the models"), severity="error", timeout=30)
        else:
            self.finish_turn()
            self.restore_prompt()
            self.notify(text, title=getattr(error, "title", "Error"), severity="error", timeout=10)

    def push_screen(self, screen, callback=None, wait_for_dismiss: bool = False):
        """Every dialog hands focus back to the message box when it closes: restored to the chat list,
        typed letters opened rename (r), delete (d) or export (x)."""
        def closed(result) -> None:
            if callback is not None:
                callback(result)
            self.call_after_refresh(self.focus_prompt)

        return super().push_screen(screen, closed, wait_for_dismiss=wait_for_dismiss)

    def focus_prompt(self) -> None:
        if len(self.screen_stack) == 1:
            self.query_one("#prompt", PromptArea).focus()

    async def action_quit(self) -> None:
        """Quit at once: a running reply is stopped and stored as stopped (waiting at most QUIT_WAIT_S for
        that; the guard's final check of it may be running), then the app exits without waiting for other
        background work."""
        self.cancel.set()
        if self._turn is not None and self._turn.is_running:
            try:
                await asyncio.wait_for(self._turn.wait(), QUIT_WAIT_S)
            except Exception:  # timed out or failed: it is marked interrupted on the next start
                pass
        self.exit()

    def on_unmount(self) -> None:
        self.cancel.set()
        if self._turn is None or not self._turn.is_running:
            self.session.detach()  # closes connections, thaws the objects attach froze

    # -- status ----------------------------------------------------------------------------------
    def refresh_banner(self) -> None:
        banner = self.query_one("#banner", Static)
        parts = []
        if self.demo:
            parts.append("DEMO: SmolLM2-135M, not Llama")
        if not self.config.guard.enabled:
            parts.append("⚠ UNGUARDED: no Llama Guard screening")
        banner.update("  ·  ".join(parts))
        banner.display = bool(parts)

    def live_status(self) -> None:
        """The status bar while a reply runs, where no frame drew it for LIVE_S (a prompt being read or checked,
        text held back for a check, frames slowed by pace_frames). A refresh of its own costs a pass of the
        compositor (several ms on a 2-core CPU); in a frame it is drawn with the reply's text."""
        if time.monotonic() - self._frame_status_at >= LIVE_S:
            self.refresh_status()

    def refresh_status(self) -> None:
        engine = self.session.describe()
        name = short_name(engine["model"])
        device = engine["where"] or self.loading_text or "…"
        window = engine["window"]
        stats = self.session.live() if self.busy else self._stats  # while a reply runs: as it runs
        used = stats.get("prompt_tokens", 0) + stats.get("new_tokens", 0)
        context = f"{used}/{window}" if window and used else (f"0/{window}" if window else "—")
        speed = f"{stats['decode_tok_s']:.1f} tok/s" if stats.get("decode_tok_s") else "— tok/s"
        if stats.get("compiled_steps"):
            speed += " (compiled)"
        guard = self.guard_state if not (self.guard_state == "loading" and self.loading_text) else "loading"
        checking = stats.get("checking") if self.busy else None
        if checking:
            guard += " · checking " + ("your message" if checking == "input" else "the reply") + "…"
        elif self.busy and self.session.guarded and self.config.guard.mode == "strict":
            guard += " · text shows once checked"
        self.query_one("#status", StatusBar).show(model=name, device=device, guard=guard, context=context, speed=speed)

    # -- conversations ---------------------------------------------------------------------------
    # -- chat ------------------------------------------------------------------------------------
    @on(PromptArea.Submitted)
    async def submitted(self, event: PromptArea.Submitted) -> None:
        """Send now, or queue the message (one at a time) until the models are ready or the running reply
        ends. A queued message stays in the box, read-only and labelled; Esc takes it back for editing."""
        text = event.text
        if not text.strip() or self.queued is not None:
            return
        if self.session.engine is None and self.loading_text in ("not loaded", "no model yet"):
            self.notify("No model is loaded (see the status bar): your message is kept. Restart llama-chat once "
                        "the model is in place, or try the demo (llama-chat --demo).", severity="warning")
            return
        if self.busy or self.session.engine is None:
            self.queue(text)
            return
        await self.send_now(text)

    def queue(self, text: str) -> None:
        self.queued = text
        prompt = self.query_one("#prompt", PromptArea)
        prompt.read_only = True
        when = "the reply above ends" if self.busy else "the model is ready"
        prompt.border_title = f"Queued: sends when {when} · Esc takes it back"
        prompt.add_class("queued")

    def unqueue(self, why: str = "") -> str | None:
        """Take the queued message back into the box for editing; returns it."""
        text, self.queued = self.queued, None
        prompt = self.query_one("#prompt", PromptArea)
        prompt.read_only = False
        prompt.border_title = None
        prompt.remove_class("queued")
        if text is not None and why:
            self.notify(why, timeout=5)
        return text

    async def send_queued(self) -> None:
        if self.queued is not None and not self.busy and self.session.engine is not None:
            await self.send_now(self.unqueue())

    async def send_now(self, text: str) -> None:
        self.busy = True  # from now: a second Enter while the views mount is queued, not sent beside it
        self._pending_text = text
        self.query_one("#prompt", PromptArea).clear()
        transcript = self.query_one("#transcript", VerticalScroll)
        if self.editing is not None:  # the edited message and everything after it are replaced
            views = list(transcript.query(MessageView))
            start = next((i for i, v in enumerate(views) if v.message_id == self.editing), len(views))
            for view in views[start:]:
                view.remove()
        self.user_view = MessageView("user", text, status="streaming", guarded=self.session.guarded)
        self.reply_view = MessageView("assistant", "", status="streaming", guarded=self.session.guarded)
        for view in (self.user_view, self.reply_view):
            view.add_class("running")
        await transcript.mount_all([self.user_view, self.reply_view])  # before any event of the turn reaches them
        transcript.anchor()  # follow the new reply, also after a search scrolled up
        self.start_turn("edit" if self.editing is not None else "send", text, self.editing)
        self.editing = None

    def start_turn(self, kind: str, text: str = "", message_id: int | None = None) -> None:
        self.busy = True
        self._frame_mark = None
        self.cancel = threading.Event()
        self._stream = None
        self._turn = self.run_turn(kind, text, message_id, self.cancel)
        # the prompt's blinking cursor repaints it twice a second: wake-ups that preempt the model's threads
        self.query_one("#prompt", PromptArea).cursor_blink = False
        self._live = self.set_interval(LIVE_S / 2, self.live_status)

    @work(thread=True, exclusive=True, exit_on_error=False, group="turn")
    def run_turn(self, kind: str, text: str, message_id: int | None, cancel: threading.Event) -> None:
        if kind == "send":
            events = self.session.send(text, cancel=cancel)
        elif kind == "edit":
            events = self.session.edit(message_id, text, cancel=cancel)
        else:
            events = self.session.regenerate(cancel=cancel)
        pending, last = "", 0.0
        for event in events:
            # Released text is handed to the UI at most FRAME_S apart: a message and a Markdown append per
            # token cost the UI thread a core's share that decoding needs (SmolLM2 decoded at 36-55 tok/s in
            # the app against 126-149 in `python -m model`).
            if isinstance(event, Released):
                pending += event.text
                if time.monotonic() - last < self.frame_s:
                    continue
                event = Released(pending)
                pending, last = "", time.monotonic()
            elif pending:
                self.post_message(TurnEvent(Released(pending)))
                pending = ""
            self.post_message(TurnEvent(event))
        if pending:
            self.post_message(TurnEvent(Released(pending)))

    async def on_turn_event(self, message: TurnEvent) -> None:
        e, reply = message.event, self.reply_view
        if isinstance(e, Changed):  # show the turns stored elsewhere, before the one now running
            self.notify(e.message, severity="warning", timeout=8)
            transcript = self.query_one("#transcript", VerticalScroll)
            await transcript.query(MessageView).exclude(".running").remove()
            views = self.message_views([m for m in self.session.stored_messages(e.conversation_id) if m.id <= e.latest])
            if views:
                await transcript.mount_all(views, before=0)
        elif isinstance(e, UserStored) and self.user_view:
            self.user_view.message_id = e.message_id
            self.refresh_conversations(self.query_one("#search", Input).value)
        elif isinstance(e, Screened):
            view = self.user_view if self.user_view and e.message_id == self.user_view.message_id else reply
            if view:
                view.message_id = e.message_id
                view.update_state(verdicts=view.verdicts + [e.verdict.to_dict()])
        elif isinstance(e, Released) and reply:
            if not reply.query(".body"):
                return  # the app is closing and took the views down first (the session stores the text)
            self.pace_frames()
            if self._stream is None:
                from textual.widgets import Markdown

                self._stream = Markdown.get_stream(reply.body)
            reply.text += e.text
            await self._stream.write(e.text)  # lets the stream's task update the open block, then:
            self.refresh_status()  # drawn in the same pass of the compositor as the text
            self._frame_status_at = time.monotonic()
        elif isinstance(e, (Blocked, Retracted)):
            await self.stop_stream()
            if isinstance(e, Blocked) and e.stage == "input" and self.user_view:
                self.user_view.update_state(status="blocked")
            if reply:
                reply.message_id = e.message_id if e.message_id != getattr(self.user_view, "message_id", None) else None
                reply.add_class("refusal")
                # an output verdict came as Screened already; an input one is shown on the refusal too
                extra = [e.verdict.to_dict()] if isinstance(e, Blocked) and e.stage == "input" else []
                reply.update_state(status="blocked", verdicts=reply.verdicts + extra, text=f"*{refusal(e.verdict)}*")
            if isinstance(e, Retracted):
                self.notify("The reply failed a guard check and was withdrawn.", severity="warning")
        elif isinstance(e, Error):
            self.notify(e.message, title=getattr(e.error, "title", "Error"), severity="error", timeout=10)
        elif isinstance(e, Done):
            await self.stop_stream()
            if e.message_id is None and e.status == "stopped":  # Esc during the input check: nothing was sent
                if self.user_view:
                    self.user_view.update_state(status="stopped")
                if reply:
                    await reply.remove()
                    self.reply_view = None
                self.restore_prompt()
                self.notify("Stopped before your message was screened; it was not sent.", timeout=5)
            elif self.user_view and self.user_view.status == "streaming":
                self.user_view.update_state(status="complete")
            if reply and e.message_id is not None:
                reply.message_id = e.message_id
                if e.status != "blocked":
                    reply.update_state(status=e.status)
            self._stats = e.stats or self._stats
            self.finish_turn()

    def pace_frames(self) -> None:
        """Keep drawing the streamed reply within a CPU budget. Each frame costs the UI thread about the same
        (tens of milliseconds: layout and repaint of the scrolled transcript), whatever the text added; on a
        CPU that the model's threads fill, that time is taken from decoding. So the interval between frames
        follows the UI thread's measured CPU share (time.thread_time), between FRAME_S and MAX_FRAME_S."""
        now, cpu = time.perf_counter(), time.thread_time()
        if self._frame_mark is not None and now > self._frame_mark[0]:
            share = (cpu - self._frame_mark[1]) / (now - self._frame_mark[0])
            target = UI_SHARE_CPU if self.session.describe()["device"] == "cpu" else UI_SHARE_OTHER
            self.frame_s = min(MAX_FRAME_S, max(FRAME_S, self.frame_s * (share / target) ** 0.5))
        self._frame_mark = (now, cpu)

    async def stop_stream(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None

    def finish_turn(self) -> None:
        self.busy = False
        if self._live is not None:
            self._live.stop()
            self._live = None
        for view in (self.user_view, self.reply_view):
            if view is not None:
                view.remove_class("running")
        self.query_one("#prompt", PromptArea).cursor_blink = self.animate
        self.refresh_status()
        self.refresh_conversations(self.query_one("#search", Input).value)
        self.call_later(self.send_queued)

    def restore_prompt(self) -> None:
        prompt = self.query_one("#prompt", PromptArea)
        if self._pending_text and not prompt.text:
            prompt.text = self._pending_text  # the typed text is never lost

    def action_stop(self) -> None:
        if self.queued is not None:  # first the newest intent: the queued message comes back to the box
            self.unqueue("The queued message was not sent; it is back in the box.")
        elif self.busy:
            self.cancel.set()
        elif self.editing is not None:
            self.editing = None
            self.query_one("#prompt", PromptArea).clear()
            self.notify("Edit cancelled.")

    async def action_regenerate(self) -> None:
        if self.busy or self.session.engine is None or self.session.conversation_id is None:
            return
        views = list(self.query_one("#transcript", VerticalScroll).query(MessageView))
        if not views or views[-1].role != "assistant" or views[-1].message_id is None:
            self.notify("There is no answered message to regenerate.", severity="warning")
            return
        views[-1].remove()
        self.user_view = views[-2] if len(views) > 1 else None
        self.reply_view = MessageView("assistant", "", status="streaming", guarded=self.session.guarded)
        self.busy = True
        await self.query_one("#transcript", VerticalScroll).mount(self.reply_view)
        self.start_turn("regenerate")

    def action_edit_last(self) -> None:
        if self.busy:
            return
        users = [v for v in self.query_one("#transcript", VerticalScroll).query(MessageView)
                 if v.role == "user" and v.message_id is not None]
        if not users:
            return
        self.editing = users[-1].message_id
        prompt = self.query_one("#prompt", PromptArea)
        prompt.text = users[-1].text
        prompt.focus()
        self.notify("Editing your last message: Enter replaces it and what follows; Esc cancels.")

    def action_new_chat(self) -> None:
        if self.busy:
            return
        self.session.new_conversation(self.config.preset(self.config.prompts.default))
        self.query_one("#transcript", VerticalScroll).remove_children()
        self._stats = {}
        self.refresh_status()
        self.query_one("#prompt", PromptArea).focus()

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one("#sidebar")
        sidebar.display = not sidebar.display

    def action_search(self) -> None:
        self.query_one("#sidebar").display = True
        self.query_one("#search", Input).focus()

    def last_view_with_verdicts(self) -> MessageView | None:
        focused = self.focused
        if isinstance(focused, MessageView):
            return focused
        views = list(self.query_one("#transcript", VerticalScroll).query(MessageView))
        return next((v for v in reversed(views) if v.verdicts or not v.guarded), None)

    def action_verdicts(self) -> None:
        view = self.last_view_with_verdicts()
        if view:
            self.show_verdicts(view)

    @on(MessageView.DetailsRequested)
    def details_requested(self, event: MessageView.DetailsRequested) -> None:
        self.show_verdicts(event.view)

    def show_verdicts(self, view: MessageView) -> None:
        input_only = view.verdicts and all(v["stage"] == "input" for v in view.verdicts)
        who = "your message" if view.role == "user" or input_only else "the reply"
        self.push_screen(VerdictScreen(f"Llama Guard verdicts on {who}", view.verdicts, view.guarded))

    def action_copy_reply(self) -> None:
        replies = [v for v in self.query_one("#transcript", VerticalScroll).query(MessageView) if v.role == "assistant"]
        if replies and replies[-1].status != "blocked":
            copy_text(self, replies[-1].text, "Reply")

    def action_copy_code(self) -> None:
        replies = [v for v in self.query_one("#transcript", VerticalScroll).query(MessageView)
                   if v.role == "assistant" and v.status != "blocked"]
        blocks = CODE_BLOCK.findall(replies[-1].text) if replies else []
        if blocks:
            copy_text(self, blocks[-1], "Code block")
        else:
            self.notify("The last reply has no code block.", severity="warning")

    # -- screens ---------------------------------------------------------------------------------
    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("About", "Built with Llama: license notice, models and versions", self.action_about)
        yield SystemCommand("System prompt", "Choose a preset or edit this conversation's system prompt",
                            self.action_system_prompt)
        yield SystemCommand("Settings", "Generation, guard mode, categories, model", self.action_settings)
        yield SystemCommand("New chat", "Start a new conversation", self.action_new_chat)
        yield SystemCommand("Regenerate reply", "Answer the last message again", self.action_regenerate)
        yield SystemCommand("Edit last message", "Change your last message and continue from there",
                            self.action_edit_last)
        yield SystemCommand("Guard verdicts", "Details of the latest guard decisions", self.action_verdicts)
        yield SystemCommand("Copy reply", "Copy the last reply", self.action_copy_reply)
        yield SystemCommand("Copy code block", "Copy the last code block of the last reply", self.action_copy_code)
        yield SystemCommand("Rename conversation", "Rename the selected conversation", self.action_rename_conversation)
        yield SystemCommand("Delete conversation", "Delete the selected conversation", self.action_delete_conversation)
        yield SystemCommand("Export conversation", "Save the selected conversation as Markdown and JSON",
                            self.action_export_conversation)
