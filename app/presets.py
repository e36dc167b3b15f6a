"""System prompt presets the user saves from the app, kept apart from their hand-written config.toml."""

from __future__ import annotations

import json

from app.paths import config_dir, private_dir


def saved_presets_file():
    return config_dir() / "saved-presets.json"


def load_saved_presets() -> dict[str, str]:
    path = saved_presets_file()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def save_preset(name: str, text: str) -> None:
    """Atomically add or replace one preset."""
    data = {**load_saved_presets(), name: text}
    private_dir(config_dir())
    tmp = saved_presets_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    tmp.replace(saved_presets_file())
