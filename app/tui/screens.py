"""Modal screens: About, verdict details, confirmations, rename, system prompt, settings, first run."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import (Button, DataTable, Input, Label, Markdown, Select, SelectionList, Static, TextArea)

from app.workspace import guard_categories

AUP_URL = "https://www.llama.com/llama3_2/use-policy/"


class Modal(ModalScreen):
    BINDINGS = [Binding("escape", "dismiss_none", "Close")]

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class AboutScreen(Modal):
    def __init__(self, about_markdown: str, models: list[str], versions: dict[str, str]):
        super().__init__(id="about")
        self.about_markdown, self.models, self.versions = about_markdown, models, versions

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            with VerticalScroll():
                yield Markdown(self.about_markdown)
                yield Markdown(f"Acceptable Use Policy: {AUP_URL}")
                yield Label("Models in use", classes="section")
                for line in self.models:
                    yield Label(f"  {line}")
                yield Label("Versions", classes="section")
                yield Label("  " + "  ".join(f"{k} {v}" for k, v in self.versions.items()))
            yield Button("Close", id="close", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)


class VerdictScreen(Modal):
    """Every guard verdict on one message: stage, result, categories, score, latency, model."""

    def __init__(self, title: str, verdicts: list[dict], guarded: bool):
        super().__init__(id="verdicts")
        self.heading, self.verdicts, self.guarded = title, verdicts, guarded

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label(self.heading, classes="title")
            if not self.guarded:
                yield Label("This message was not screened: the guard was off.", classes="warning")
            table = DataTable(cursor_type="row", zebra_stripes=True)
            table.add_columns("stage", "result", "categories", "score", "ms", "guard model")
            for v in self.verdicts:
                result = "passed" if v["safe"] else "blocked"
                cats = ", ".join(v.get("category_names") or []) or v.get("reason") or "-"
                table.add_row(v["stage"], result, cats, f"{(v.get('score') or 0):.3f}",
                              f"{(v.get('latency_s') or 0) * 1000:.0f}", (v.get("guard_model") or "-") + (
                                  f" ({v['engine']})" if v.get("engine") not in (None, "", "local") else ""))
            yield table
            yield Button("Close", id="close", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)


class ConfirmScreen(Modal):
    def __init__(self, question: str, confirm: str = "Delete"):
        super().__init__(id="confirm")
        self.question, self.confirm = question, confirm

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="title")
            with Horizontal(classes="buttons"):
                yield Button(self.confirm, id="yes", variant="error")
                yield Button("Cancel", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class TextInputScreen(Modal):
    def __init__(self, prompt: str, value: str = "", *, screen_id: str = "text-input"):
        super().__init__(id=screen_id)
        self.prompt, self.value = prompt, value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.prompt, classes="title")
            yield Input(self.value, id="value")
            with Horizontal(classes="buttons"):
                yield Button("OK", id="ok", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.query_one("#value", Input).value.strip() or None if event.button.id == "ok" else None)


class SystemPromptScreen(Modal):
    """Pick a preset, edit the text for this conversation, or save it as a preset.
    Dismisses with ("apply", text) or ("save", name, text)."""

    def __init__(self, presets: dict[str, str], current: str):
        super().__init__(id="system-prompt")
        self.presets, self.current = presets, current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("System prompt for this conversation", classes="title")
            chosen = next((k for k, v in self.presets.items() if v == self.current), Select.NULL)
            yield Select([(name, name) for name in self.presets], value=chosen, prompt="Presets", id="preset")
            yield TextArea(self.current, id="text", soft_wrap=True)
            with Horizontal(classes="buttons"):
                yield Button("Apply", id="apply", variant="primary")
                yield Button("Save as preset…", id="save")
                yield Button("Cancel", id="cancel")

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.value in self.presets:
            self.query_one("#text", TextArea).text = self.presets[event.value]

    def on_button_pressed(self, event: Button.Pressed) -> None:
        text = self.query_one("#text", TextArea).text.strip()
        if event.button.id == "apply":
            self.dismiss(("apply", text))
        elif event.button.id == "save":
            def named(name):
                if name:
                    self.dismiss(("save", name, text))

            self.app.push_screen(TextInputScreen("Preset name", screen_id="preset-name"), named)
        else:
            self.dismiss(None)


class SettingsScreen(Modal):
    """Generation, guard and model settings for this run. Dismisses with a dict of changes."""

    def __init__(self, config, model_choices: list[tuple[str, str]], guard_available: bool):
        super().__init__(id="settings")
        self.config, self.model_choices, self.guard_available = config, model_choices, guard_available

    def compose(self) -> ComposeResult:
        g, c = self.config.generation, self.config
        with Vertical(classes="dialog wide"):
            yield Label("Settings (for this run)", classes="title")
            with VerticalScroll():
                yield Label("Model")
                sources = [v for _, v in self.model_choices]
                label = c.model.source.rstrip("/").split("/")[-1]
                choices = self.model_choices + ([] if c.model.source in sources else [(label, c.model.source)])
                yield Select(choices, value=c.model.source, allow_blank=False, id="model")
                yield Input(placeholder="…or a path to a folder, .gguf or Meta original folder", id="model-path")
                yield Label("CPU weight mode")
                yield Select([("auto: int4 where it is fast, else bf16", "auto"), ("bf16: full precision", "bf16"),
                              ("int8: ~2x faster, near-lossless", "int8"), ("int4: fastest with good quality", "int4"),
                              ("int4-fast: fastest, lower quality", "int4-fast")],
                             value=c.model.quantize, allow_blank=False, id="quantize")
                with Horizontal(classes="row"):
                    yield Label("Temperature")
                    yield Input("" if g.temperature is None else str(g.temperature), placeholder="model default",
                                id="temperature")
                    yield Label("top_p")
                    yield Input("" if g.top_p is None else str(g.top_p), placeholder="model default", id="top_p")
                    yield Label("Max tokens")
                    yield Input(str(g.max_new_tokens), id="max_new_tokens")
                with Horizontal(classes="row"):
                    yield Label("Repetition penalty (1 is off)")
                    yield Input("" if g.repetition_penalty is None else str(g.repetition_penalty),
                                placeholder="model default", id="repetition_penalty")
                yield Label("Guard mode" + ("" if self.guard_available else " (guard is off)"))
                yield Select([("strict: show only checked text", "strict"), ("fast: show at once, retract if unsafe", "fast")],
                             value=c.guard.mode, allow_blank=False, id="mode")
                yield Label("Guard precision")
                yield Select([("auto: int8 where it runs fast and passes its probe check", "auto"),
                              ("bf16: unquantized", "bf16"), ("int8: native int8 kernel", "int8")],
                             value=c.guard.precision, allow_blank=False, id="precision")
                yield Label("Categories screened (unticked ones are excluded)")
                yield SelectionList(*[(f"{code} {name}", code, code not in c.guard.excluded)
                                      for code, name in guard_categories()], id="categories")
            with Vertical(classes="actions"):  # docked: the error and the buttons show at any window size
                yield Static("", id="error", classes="warning")
                with Horizontal(classes="buttons"):
                    yield Button("Apply", id="apply", variant="primary")
                    yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id != "apply":
            self.dismiss(None)
            return
        try:
            changes = self.collect()
        except ValueError as e:
            self.query_one("#error", Static).update(f"Not applied: {e}.")
            self.app.bell()
            return
        self.dismiss(changes)

    def collect(self) -> dict:
        def number(id_, cast, lo, hi, optional=True):
            text = self.query_one(f"#{id_}", Input).value.strip()
            if not text and optional:
                return None
            try:
                value = cast(text)
            except ValueError:
                raise ValueError(f"{id_.replace('_', ' ')}: {text!r} is not a number") from None
            if not lo <= value <= hi:
                raise ValueError(f"{id_.replace('_', ' ')} must be between {lo} and {hi}")
            return value

        screened = set(self.query_one("#categories", SelectionList).selected)
        path = self.query_one("#model-path", Input).value.strip()
        return {
            "model.source": path or self.query_one("#model", Select).value,
            "model.quantize": self.query_one("#quantize", Select).value,
            "generation.temperature": number("temperature", float, 0, 2),
            "generation.top_p": number("top_p", float, 0.01, 1),
            "generation.repetition_penalty": number("repetition_penalty", float, 0.01, 2),
            "generation.max_new_tokens": number("max_new_tokens", int, 1, 32768, optional=False),
            "guard.mode": self.query_one("#mode", Select).value,
            "guard.precision": self.query_one("#precision", Select).value,
            "guard.excluded": [code for code, _ in guard_categories() if code not in screened],
        }


class FirstRunScreen(Modal):
    """No chat model yet: explain the gated models and offer the download or the demo model.
    Dismisses with "download", "demo" or None (quit)."""

    BINDINGS = [Binding("escape", "dismiss_none", "Quit")]

    def __init__(self, model: str, guard: str, demo_available: bool, problem: str = ""):
        super().__init__(id="first-run")
        self.model, self.guard, self.demo_available, self.problem = model, guard, demo_available, problem

    def compose(self) -> ComposeResult:
        text = f"""# Welcome to llama-chat

No copy of **{self.model}** was found on this machine.

Meta's Llama models are *gated*. To download them once:

1. Open `https://huggingface.co/{self.model}` (and `{self.guard}`) and accept the
   **Llama 3.2 Community License** with your Hugging Face account.
2. Create a read token at `https://huggingface.co/settings/tokens`.
3. Run `hf auth login` (or set `HF_TOKEN`), then choose **Download** below.

After that, nothing leaves this machine: both models run locally.
"""
        with Vertical(classes="dialog wide"):
            if self.problem:
                yield Static(self.problem, classes="warning", markup=False)
            with VerticalScroll():
                yield Markdown(text)
                if self.demo_available:
                    yield Markdown("Or try the app right away with **SmolLM2-135M-Instruct**, a small demo model "
                                   "that is *not* Llama, running **unguarded**.")
            with Horizontal(classes="buttons"):
                yield Button("Try the download again" if self.problem else "Download", id="download",
                             variant="primary")
                if self.demo_available:
                    yield Button("Use demo model", id="demo")
                yield Button("Quit", id="quit")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss({"download": "download", "demo": "demo"}.get(event.button.id))
