"""Self-contained widgets: a chat message with its guard badge, the prompt box, the status bar."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.geometry import Size
from textual.message import Message
from textual.reactive import Reactive
from textual.widgets import Label, Markdown, Static, TextArea


def badge_for(status: str, verdicts: list, guarded: bool) -> tuple[str, str]:
    """(text, css class) summarising a message's guard state at a glance."""
    failed = [v for v in verdicts if not v["safe"]]
    if status == "blocked" or failed:
        v = failed[-1] if failed else {}
        names = ", ".join(v.get("category_names") or []) or v.get("reason") or "unsafe"
        return f"✗ blocked: {names}", "blocked"
    extra = {"stopped": " · stopped", "interrupted": " · interrupted", "error": " · error",
             "streaming": " · …"}.get(status, "")
    if not guarded:
        return "unguarded" + extra, "unguarded"
    if verdicts:
        return "✓ passed" + extra, "passed"
    return ("screening…" if status == "streaming" else "not screened") + extra, "pending"


def placed(cls: type) -> type:
    """`cls`, laid out once per change. A layout that gives a widget a new size also sets its `virtual_size`,
    and that reactive asks Textual for another layout of the whole screen: one that changes nothing, since
    the first already placed every widget at its new size, scrolled an anchored container to its end (in the
    compositor) and updated scrollbars (showing or hiding one has a layout reactive of its own). While a
    reply streams, each frame grows the reply and the transcript, so every frame was laid out twice."""
    return type(cls.__name__, (cls,), {"virtual_size": Reactive(Size(0, 0), layout=False), "__module__": __name__})


Transcript = placed(VerticalScroll)


@placed
class ReplyMarkdown(Markdown):
    """A reply's Markdown, its blocks `placed` too."""

    BLOCKS = {name: placed(block) for name, block in Markdown.BLOCKS.items()}


@placed
class MessageView(Vertical, can_focus=True):
    """One message of the transcript. Enter (or v) opens its guard verdicts."""

    BINDINGS = [Binding("enter,v", "details", "Verdicts"), Binding("c", "copy", "Copy")]

    class DetailsRequested(Message):
        def __init__(self, view: "MessageView"):
            super().__init__()
            self.view = view

    def __init__(self, role: str, text: str = "", *, message_id: int | None = None, status: str = "complete",
                 verdicts: list | None = None, guarded: bool = True):
        super().__init__(classes=f"message {role}")
        self.role, self.text, self.message_id = role, text, message_id
        self.status, self.verdicts, self.guarded = status, list(verdicts or []), guarded

    def compose(self):
        who = "You" if self.role == "user" else "Assistant"
        yield Label(who, classes="who")
        if self.role == "user":  # as typed: Markdown would eat `__init__`, `a*b*c`, HTML and single newlines
            yield Static(self.text, classes="body", markup=False)
        else:
            yield ReplyMarkdown(self.text, classes="body")
        text, cls = badge_for(self.status, self.verdicts, self.guarded)
        yield Label(text, classes=f"badge {cls}")

    def on_mount(self) -> None:
        self.set_class(self.status == "blocked", "is-blocked")

    @property
    def body(self) -> Markdown | Static:
        return self.query_one(".body")

    def update_state(self, *, status: str | None = None, verdicts: list | None = None, text: str | None = None) -> None:
        if status is not None:
            self.status = status
        if verdicts is not None:
            self.verdicts = list(verdicts)
        if not self.query(".badge"):  # not composed yet: compose draws the state just set
            self.text = self.text if text is None else text
            return
        if text is not None:
            self.text = text
            self.body.update(text)
        label, cls = badge_for(self.status, self.verdicts, self.guarded)
        badge = self.query_one(".badge", Label)
        badge.update(label)
        badge.set_classes(f"badge {cls}")
        self.set_class(self.status == "blocked", "is-blocked")

    def action_details(self) -> None:
        self.post_message(self.DetailsRequested(self))

    def action_copy(self) -> None:
        from app.tui.clipboard import copy_text

        copy_text(self.app, self.text, "Message")


class PromptArea(TextArea):
    """The message box: Enter sends, Ctrl+J (or Shift+Enter where the terminal sends it) adds a line."""

    NEWLINE_KEYS = ("ctrl+j", "shift+enter")

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    async def _on_key(self, event) -> None:
        # Both handled here, in key order: a binding's action runs later, so typing fast put the newline
        # after the letters that followed it ("AAA" Ctrl+J "BBB" became "AAABBB\n").
        if event.key == "enter" or (event.key in self.NEWLINE_KEYS and not self.read_only):
            event.stop()
            event.prevent_default()
            if event.key == "enter":
                self.post_message(self.Submitted(self.text))
            else:
                self.insert("\n")
            return
        await super()._on_key(event)


class StatusBar(Static):
    """Model and device · guard state · context used · speed of the last reply."""

    text = ""

    def show(self, *, model: str, device: str, guard: str, context: str, speed: str) -> None:
        text = f" {model} · {device} │ guard {guard} │ ctx {context} │ {speed}"
        if text != self.text:  # one line whatever it says: a repaint, not a layout of the whole screen
            self.text = text
            self.update(text, layout=False)
