"""What this machine offers the model layer: a C++ compiler, the app's cache folder. Imports nothing of
llama-chat, so every module may use it."""

from __future__ import annotations

import os
from pathlib import Path


def find_cxx() -> str | None:
    """The C++ compiler torch.compile and model.qkernel would use ($CXX, g++, clang++, c++), or None."""
    import shutil

    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def app_cache_folder() -> Path:
    """The app's cache folder (LLAMA_CHAT_HOME aware) without importing the app package."""
    home = os.environ.get("LLAMA_CHAT_HOME")
    if home:
        return Path(home).expanduser() / "cache"
    from platformdirs import user_cache_path

    return user_cache_path("llama-chat")
