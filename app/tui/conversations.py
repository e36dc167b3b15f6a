"""The conversation sidebar: list (newest first), full-text search, open, rename, delete, export.

A mixin of the app: its handlers use Textual's on_<message> names (decorated handlers are only
collected from App subclasses themselves).
"""

from __future__ import annotations

import functools

from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Input, OptionList
from textual.widgets.option_list import Option

from app.errors import LlamaChatError
from app.tui.screens import ConfirmScreen, TextInputScreen
from app.tui.widgets import MessageView, PromptArea


class ConversationList(OptionList):
    BINDINGS = [Binding("r", "rename", "Rename"), Binding("delete,d", "delete", "Delete"),
                Binding("x", "export", "Export")]

    def action_rename(self) -> None:
        self.app.action_rename_conversation()

    def action_delete(self) -> None:
        self.app.action_delete_conversation()

    def action_export(self) -> None:
        self.app.action_export_conversation()


def reported(method):
    """A UI-thread action whose failure (a damaged or busy history) is shown; raised, it would end the app."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except LlamaChatError as e:
            self.app.notify(e.message, title=e.title, severity="error", timeout=20)
    return run


class ConversationsMixin:
    @reported
    def refresh_conversations(self, query: str = "") -> None:
        listing = self.query_one("#conversations", ConversationList)
        listing.clear_options()
        if query.strip():
            hits = self.session.search(query)
            self.search_hits = {h["conversation_id"]: h["message_id"] for h in hits}
            rows = [(h["conversation_id"], h["title"]) for h in hits]
        else:
            self.search_hits = {}
            rows = self.session.conversations()
        listing.add_options([Option(title, id=f"c{cid}") for cid, title in rows])
        ids = [f"c{cid}" for cid, _title in rows]
        if f"c{self.session.conversation_id}" in ids:
            listing.highlighted = ids.index(f"c{self.session.conversation_id}")
        elif query.strip() and ids:  # the best match, so Enter opens it
            listing.highlighted = 0

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "search":
            self.refresh_conversations(event.value)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option_list.id != "conversations":
            return
        if self.busy:
            self.notify("Wait for the reply to finish, or press Esc to stop it.", severity="warning")
            return
        cid = int(event.option.id[1:])
        self.open_conversation(cid, getattr(self, "search_hits", {}).get(cid))

    @reported
    def open_conversation(self, cid: int, show_message: int | None = None) -> None:
        """Show conversation `cid`, at its end or, from a search, at the matching message (focused)."""
        conv = self.session.open(cid)
        self.editing = None
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.remove_children()
        transcript.mount_all(self.message_views(conv.messages))
        last = next((m.stats for m in reversed(conv.messages) if m.stats), None)
        self._stats = last or {}
        self.refresh_status()
        match = next((v for v in transcript.query(MessageView) if v.message_id == show_message), None)
        if match is None:
            self.query_one("#prompt", PromptArea).focus()
        else:
            transcript.release_anchor()
            self.call_after_refresh(lambda: (transcript.scroll_to_widget(match, top=True, animate=False),
                                             match.focus(scroll_visible=False)))

    def message_views(self, messages) -> list[MessageView]:
        return [MessageView(m.role, self.display_text(m), message_id=m.id, status=m.status, verdicts=m.verdicts,
                            guarded=m.guarded) for m in messages]

    @staticmethod
    def display_text(m) -> str:
        if m.status != "blocked":
            return m.marked_text()
        failed = [v for v in m.verdicts if not v["safe"]]
        names = ", ".join(failed[-1]["category_names"]) if failed else ""
        return f"*Blocked by Llama Guard ({names or 'unsafe content'}).*"

    def selected_conversation(self) -> int | None:
        listing = self.query_one("#conversations", ConversationList)
        if listing.highlighted is not None and listing.option_count:
            return int(listing.get_option_at_index(listing.highlighted).id[1:])
        return self.session.conversation_id

    @reported
    def action_rename_conversation(self) -> None:
        cid = self.selected_conversation()
        if cid is None:
            return
        title = self.session.title(cid)
        self.push_screen(TextInputScreen("Rename conversation", title, screen_id="rename"),
                         functools.partial(self.rename_to, cid))

    @reported
    def rename_to(self, cid: int, title: str | None) -> None:
        if title:
            self.session.rename(cid, title)
            self.refresh_conversations(self.query_one("#search", Input).value)

    @reported
    def action_delete_conversation(self) -> None:
        cid = self.selected_conversation()
        if cid is None or self.busy:
            return
        title = self.session.title(cid)
        self.push_screen(ConfirmScreen(f"Delete “{title}” and all its messages?"),
                         functools.partial(self.delete_confirmed, cid, title))

    @reported
    def delete_confirmed(self, cid: int, title: str, yes: bool) -> None:
        if yes:
            self.session.delete(cid)
            if self.session.conversation_id == cid:
                self.action_new_chat()
            self.refresh_conversations(self.query_one("#search", Input).value)
            self.notify(f"Deleted “{title}”.")

    @reported
    def action_export_conversation(self) -> None:
        """Markdown and JSON copies in the data folder's exports/, readable by the owner only, under names
        not yet taken (an earlier export is never overwritten); a failure is shown, nothing half-written kept."""
        from app.paths import data_dir, private_dir

        cid = self.selected_conversation()
        if cid is None:
            return
        folder = data_dir() / "exports"
        try:
            private_dir(folder)
            written = [write_new(folder, f"conversation-{cid}", suffix, self.session.export(cid, suffix[1:]))
                       for suffix in (".md", ".json")]
        except OSError as e:
            self.notify(f"Could not export to {folder}: {e.strerror or e}. Nothing was overwritten; the "
                        "conversation is still in the history.", title="Export failed", severity="error", timeout=15)
            return
        self.notify(f"Exported to {written[0]} (and {written[1].name}).", timeout=8)


def write_new(folder, stem: str, suffix: str, text: str):
    """Write `text` to the first of stem.suffix, stem-2.suffix, ... that does not exist yet, mode 0600."""
    import os

    for n in range(1, 10_000):
        path = folder / (f"{stem}{suffix}" if n == 1 else f"{stem}-{n}{suffix}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path
    raise FileExistsError(f"{folder} already holds 9,999 exports of {stem}")
