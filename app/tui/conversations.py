"""The conversation sidebar: list (newest first), full-text search, open, rename, delete, export.

A mixin of the app: its handlers use Textual's on_<message> names (decorated handlers are only
collected from App subclasses themselves).
"""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Input, OptionList
from textual.widgets.option_list import Option

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


class ConversationsMixin:
    def refresh_conversations(self, query: str = "") -> None:
        listing = self.query_one("#conversations", ConversationList)
        listing.clear_options()
        if query.strip():
            rows = [(h["conversation_id"], h["title"]) for h in self.history.search(query)]
        else:
            rows = [(c.id, c.title) for c in self.history.list_conversations()]
        listing.add_options([Option(title, id=f"c{cid}") for cid, title in rows])
        if self.session.conversation_id is not None:
            try:
                listing.highlighted = listing.get_option_index(f"c{self.session.conversation_id}")
            except Exception:  # not in the filtered list
                pass

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "search":
            self.refresh_conversations(event.value)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option_list.id != "conversations":
            return
        if self.busy:
            self.notify("Wait for the reply to finish, or press Esc to stop it.", severity="warning")
            return
        self.open_conversation(int(event.option.id[1:]))

    def open_conversation(self, cid: int) -> None:
        conv = self.session.open(cid)
        self.editing = None
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.remove_children()
        transcript.mount_all([MessageView(m.role, self.display_text(m.content, m.status, m.verdicts), message_id=m.id,
                                          status=m.status, verdicts=m.verdicts, guarded=m.guarded)
                              for m in conv.messages])
        last = next((m.stats for m in reversed(conv.messages) if m.stats), None)
        self._stats = last or {}
        self.refresh_status()
        self.query_one("#prompt", PromptArea).focus()

    @staticmethod
    def display_text(text: str, status: str, verdicts: list) -> str:
        if status != "blocked":
            return text
        failed = [v for v in verdicts if not v["safe"]]
        names = ", ".join(failed[-1]["category_names"]) if failed else ""
        return f"*Blocked by Llama Guard ({names or 'unsafe content'}).*"

    def selected_conversation(self) -> int | None:
        listing = self.query_one("#conversations", ConversationList)
        if listing.highlighted is not None and listing.option_count:
            return int(listing.get_option_at_index(listing.highlighted).id[1:])
        return self.session.conversation_id

    def action_rename_conversation(self) -> None:
        cid = self.selected_conversation()
        if cid is None:
            return

        def renamed(title):
            if title:
                self.history.update_conversation(cid, title=title)
                self.refresh_conversations(self.query_one("#search", Input).value)

        title = self.history.get_conversation(cid, with_messages=False).title
        self.push_screen(TextInputScreen("Rename conversation", title, screen_id="rename"), renamed)

    def action_delete_conversation(self) -> None:
        cid = self.selected_conversation()
        if cid is None or self.busy:
            return
        title = self.history.get_conversation(cid, with_messages=False).title

        def confirmed(yes):
            if yes:
                self.history.delete_conversation(cid)
                if self.session.conversation_id == cid:
                    self.action_new_chat()
                self.refresh_conversations(self.query_one("#search", Input).value)
                self.notify(f"Deleted “{title}”.")

        self.push_screen(ConfirmScreen(f"Delete “{title}” and all its messages?"), confirmed)

    def action_export_conversation(self) -> None:
        from app.paths import data_dir, private_dir

        cid = self.selected_conversation()
        if cid is None:
            return
        folder = private_dir(data_dir() / "exports")
        path = folder / f"conversation-{cid}.md"
        path.write_text(self.history.export(cid, "md"), encoding="utf-8")
        (folder / f"conversation-{cid}.json").write_text(self.history.export(cid, "json"), encoding="utf-8")
        self.notify(f"Exported to {path} (and .json).", timeout=8)
