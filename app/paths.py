"""Where llama-chat keeps its files. `LLAMA_CHAT_HOME` moves every location under one folder (tests
always set it). Nothing is created at import time."""

from __future__ import annotations

import os
from pathlib import Path

APP = "llama-chat"


def _home() -> Path | None:
    value = os.environ.get("LLAMA_CHAT_HOME")
    return Path(value).expanduser() if value else None


def config_dir() -> Path:
    home = _home()
    if home:
        return home / "config"
    from platformdirs import user_config_path

    return user_config_path(APP)


def data_dir() -> Path:
    home = _home()
    if home:
        return home / "data"
    from platformdirs import user_data_path

    return user_data_path(APP)


def cache_dir() -> Path:
    home = _home()
    if home:
        return home / "cache"
    from platformdirs import user_cache_path

    return user_cache_path(APP)


def config_file() -> Path:
    return config_dir() / "config.toml"


def database_file() -> Path:
    return data_dir() / "history.sqlite3"


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) readable by its owner only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
