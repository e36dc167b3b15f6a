"""The app's dialogs: About, system prompt, settings (a mixin of the app)."""

from __future__ import annotations

from importlib import metadata

from app.tui.screens import AboutScreen, SettingsScreen, SystemPromptScreen

MODEL_CHOICES = [("Llama 3.2 1B Instruct", "meta-llama/Llama-3.2-1B-Instruct"),
                 ("Llama 3.2 3B Instruct", "meta-llama/Llama-3.2-3B-Instruct")]


class DialogsMixin:
    def action_about(self) -> None:
        from assets import read_text

        engine = self.session.describe()
        models = [f"chat: {engine['model']}" + (f" ({engine['where']})" if engine["where"] else ""),
                  f"guard: {self.config.guard.source if self.config.guard.enabled else 'off (unguarded)'}"
                  + (f" ({engine['guard']})" if engine["guard"] else "")]
        self.push_screen(AboutScreen(read_text("about.md"), models, self.versions()))

    @staticmethod
    def versions() -> dict[str, str]:
        out = {}
        for dist in ("llama-chat", "textual", "torch", "transformers"):
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[dist] = "not installed"
        return out

    def action_system_prompt(self) -> None:
        def chosen(result):
            if not result:
                return
            if result[0] == "save":
                _kind, name, text = result
                from app.presets import save_preset

                save_preset(name, text)
                self.notify(f"Saved preset “{name}”.")
            self.session.set_system_prompt(result[-1])  # the runner recomputes from the first changed token
            self.notify("System prompt set for this conversation.")

        self.push_screen(SystemPromptScreen(self.config.all_presets(), self.session.system_prompt), chosen)

    def action_settings(self) -> None:
        def applied(changes):
            if not changes:
                return
            from app.config import apply_setting

            def reloads():  # the settings that need the models loaded again
                return self.config.model.source, self.config.model.quantize, self.config.guard.precision

            old = reloads()
            for dotted, value in changes.items():
                section, _, key = dotted.partition(".")
                if value is None:
                    setattr(getattr(self.config, section), key, None)
                else:
                    apply_setting(self.config, section, key, value, where="settings")
            if reloads() != old:
                if self.busy:
                    self.cancel.set()
                self.session.detach()
                self.loading_text = "reloading…"
                self.guard_state = "loading" if self.config.guard.enabled else "off"
                self.refresh_status()
                self.load_models()
            self.notify("Settings applied for this run.")

        # the cached checkpoints, and every model that loaded in this run (a failed switch keeps them listed)
        cached = self.session.cached_models()
        extra = cached + [s for s in self.loaded_sources if s not in cached]
        choices = MODEL_CHOICES + [(s.rstrip("/").split("/")[-1], s) for s in extra
                                   if s not in dict(MODEL_CHOICES).values()]
        self.push_screen(SettingsScreen(self.config, choices, self.config.guard.enabled), applied)
