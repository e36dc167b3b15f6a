"""What a chat session answers besides turns: the stored conversations, which models are present, the demo,
downloads, the guard's categories, and how to describe the engine. The TUI asks these of the session
(`ChatSession` is a `Workspace`) and imports nothing of model/, guard/, app.history or app.cli itself.

Reads and edits of the stored conversations run on `browse`, the UI thread's own connection; turns write
on `history`, the worker's.
"""

from __future__ import annotations

import gc

from app.errors import HistoryDamaged, LlamaChatError

DAMAGED = "the history file is damaged; recover it first (llama-chat history recover)"


def guard_categories() -> list[tuple[str, str]]:
    """Llama Guard 3's categories (code, display name), in their order."""
    from guard.categories import DISPLAY_NAMES, LLAMA_GUARD_3_CATEGORIES

    return [(code, DISPLAY_NAMES[code]) for code in LLAMA_GUARD_3_CATEGORIES]


def open_histories():
    """(the turns' connection, the UI thread's, the damage found or None) for the app: the file is checked
    first; a damaged one is left alone, and both connections are to an empty history that stores nothing."""
    from app.history import History
    from app.paths import database_file

    try:
        browse = History()
        browse.check()
        return History(browse.path), browse, None
    except HistoryDamaged as e:
        return History.scratch(database_file(), DAMAGED), History.scratch(database_file(), DAMAGED), e


class Workspace:
    history = browse = config = engine = None
    conversation_id: int | None = None
    history_problem: HistoryDamaged | None = None
    _froze = False  # attach froze the objects alive then (see attach)

    # -- stored conversations --------------------------------------------------------------------
    @property
    def read_only(self) -> str:
        """Why nothing is stored in this run ("" when turns are stored)."""
        return self.history.read_only_reason if self.history.read_only else ""

    def conversations(self) -> list[tuple[int, str]]:
        """(id, title) of every conversation, the latest first."""
        return [(c.id, c.title) for c in self.browse.list_conversations()]

    def search(self, query: str) -> list[dict]:
        return self.browse.search(query)

    def title(self, conversation_id: int) -> str:
        return self.browse.get_conversation(conversation_id, with_messages=False).title

    def rename(self, conversation_id: int, title: str) -> None:
        self.browse.update_conversation(conversation_id, title=title)

    def delete(self, conversation_id: int) -> None:
        self.browse.delete_conversation(conversation_id)

    def export(self, conversation_id: int, fmt: str) -> str:
        return self.browse.export(conversation_id, fmt)

    def stored_messages(self, conversation_id: int | None = None) -> list:
        """A conversation's stored messages (the open one by default), as the UI thread reads them."""
        cid = self.conversation_id if conversation_id is None else conversation_id
        return self.browse.messages(cid) if cid is not None else []

    def recover_history(self):
        """Copy what is readable of the damaged history into a new file (app.history.recover) and continue on
        it; returns the `Recovery`."""
        from app.history import recover

        result = recover(self.browse.path)
        self.history, self.browse, self.history_problem = open_histories()
        return result

    # -- models ----------------------------------------------------------------------------------
    def model_problem(self) -> str | None:
        """Why the configured chat model cannot load (not downloaded, no such file), or None. Never touches
        the network: a server model needs its tokenizer here, and whether the server answers is known on load."""
        from model.errors import ModelError
        from model.loading import resolve_source, resolve_tokenizer

        m = self.config.model
        try:
            (resolve_tokenizer if m.backend == "openai" else resolve_source)(m.source)
        except ModelError as e:
            return e.message
        return None

    @staticmethod
    def demo_available() -> bool:
        from app.demo import demo_model_path

        try:
            demo_model_path()
        except LlamaChatError:
            return False
        return True

    def use_demo(self) -> None:
        """The demo model (SmolLM2-135M, local, unguarded) with its sampling, for this run."""
        from app.demo import demo_model_path, use_demo_sampling

        self.config.model.source, self.config.model.backend = demo_model_path(), "local"
        use_demo_sampling(self.config)
        self.config.guard.enabled = False

    def download(self, progress) -> None:
        """Fetch the configured models from Hugging Face (for one on a server, just its tokenizer)."""
        from app.download import download

        for section in (self.config.model, self.config.guard):
            progress(f"downloading {section.source}…")
            download(section.source, progress=progress, tokenizer_only=section.backend == "openai")

    @staticmethod
    def cached_models() -> list[str]:
        """Llama chat checkpoints present in the local Hugging Face cache."""
        try:
            from huggingface_hub import scan_cache_dir

            repos = scan_cache_dir().repos
        except Exception:  # no cache folder yet
            return []
        return sorted(r.repo_id for r in repos if r.repo_type == "model" and "llama" in r.repo_id.lower()
                      and "guard" not in r.repo_id.lower())

    def attach(self, engine) -> list[str]:
        """Answer with `engine` from now on; returns what the user should know of it (a slower mode in use).

        The objects alive now (torch, transformers, the models: hundreds of thousands) live as long as the
        engine, so they are frozen out of the cyclic collector (gc.freeze) until `detach`: in the oldest
        generation a full collection still walked them all, with the GIL held, whenever the UI's own objects
        piled up, stalling decoding and drawing alike in the middle of a reply. Garbage among them is found
        again once they are thawed."""
        if self.engine is None and not gc.get_freeze_count():
            gc.freeze()
            self._froze = True
        self.engine = engine
        engine.runner.reset()
        return [n for n in (engine.runner.quantize_note, engine.guard.precision_note if engine.guard else "") if n]

    def detach(self) -> None:
        """Let the engine go (settings that need the models loaded again)."""
        if self.engine is not None:
            self.engine.runner.close()
            if self.engine.guard is not None:
                self.engine.guard.close()
        self.engine = None
        if self._froze:
            gc.unfreeze()
            self._froze = False

    def describe(self) -> dict:
        """The engine for a status bar: the chat model's name, where it runs (and its device: cpu, cuda, mps,
        remote), its context window, the guard."""
        engine = self.engine
        if engine is None:
            return {"model": self.config.model.source, "where": "", "window": None, "guard": "", "device": "cpu"}
        r, g = engine.runner, engine.guard
        where = r.describe()
        if r.quantize_note:
            where += f" {r.quantize} ({self.config.model.quantize} is slow here: see doctor)"
        if g is None:
            guard = "off"
        else:
            guard = f"on {g.precision}".strip() if g.engine == "local" else f"on {g.name} ({g.engine})"
        if g is not None and g.precision_note.startswith("int8 refused"):
            guard += " (int8 refused)"
        return {"model": engine.model_name, "where": where, "window": r.context_window, "guard": guard,
                "device": r.device}
