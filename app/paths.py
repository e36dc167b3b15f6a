"""Where llama-chat keeps its files. `LLAMA_CHAT_HOME` moves every location under one folder (tests
always set it). Nothing is created at import time."""

from __future__ import annotations

import os
from pathlib import Path

APP = "llama-chat"


def _location(sub: str, platform_path) -> Path:
    home = os.environ.get("LLAMA_CHAT_HOME")
    return Path(home).expanduser() / sub if home else platform_path(APP)


def config_dir() -> Path:
    from platformdirs import user_config_path

    return _location("config", user_config_path)


def data_dir() -> Path:
    from platformdirs import user_data_path

    return _location("data", user_data_path)


def cache_dir() -> Path:
    from model.host import app_cache_folder  # the model layer caches there too; one definition

    return app_cache_folder()


def config_file() -> Path:
    return config_dir() / "config.toml"


def database_file() -> Path:
    return data_dir() / "history.sqlite3"


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) readable by its owner only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
