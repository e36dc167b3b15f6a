"""Files llama-chat ships: system prompt presets, the About text, an example configuration."""

from __future__ import annotations

from importlib import resources


def read_text(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
