"""Copying text so that it really reaches a clipboard, and saying where it went.

Textual's copy_to_clipboard sends OSC 52, which many terminals and tmux (by default) ignore silently. A
clipboard tool, where one is installed and its display is there, is used instead; otherwise the text goes
out as OSC 52 and is also saved to a file, and the message says both.
"""

from __future__ import annotations

import os
import shutil
import subprocess

TOOLS = [  # (program and arguments, the environment variable it needs, if any)
    (["pbcopy"], None),
    (["wl-copy"], "WAYLAND_DISPLAY"),
    (["xclip", "-selection", "clipboard"], "DISPLAY"),
    (["xsel", "--clipboard", "--input"], "DISPLAY"),
    (["tmux", "load-buffer", "-w", "-"], "TMUX"),
]


def clipboard_tool() -> list[str] | None:
    for command, needs in TOOLS:
        if (needs is None or os.environ.get(needs)) and shutil.which(command[0]):
            return command
    return None


def copy_text(app, text: str, what: str) -> None:
    """Copy `text` for `app` and notify what happened ("Reply copied…", or where the text was saved)."""
    command = clipboard_tool()
    if command is not None:
        try:
            subprocess.run(command, input=text.encode(), check=True, timeout=5, capture_output=True)
        except (OSError, subprocess.SubprocessError) as e:
            command, failed = None, f"{command[0]} failed ({e}); "
        else:
            where = "tmux's paste buffer (prefix ])" if command[0] == "tmux" else f"the clipboard ({command[0]})"
            app.notify(f"{what} copied to {where}.")
            return
    else:
        failed = ""
    path = save_copy(text)
    app.copy_to_clipboard(text)
    app.notify(f"{failed}{what} sent to the terminal's clipboard, which it may ignore (tmux and some terminals "
               f"do), and saved to {path}.", timeout=10)


def save_copy(text: str):
    """The last copied text, in the data folder, owner-only (replaced on each copy, as a clipboard is)."""
    from app.paths import data_dir, private_dir

    path = private_dir(data_dir()) / "clipboard.txt"
    temp = path.with_name(".clipboard.txt.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temp, path)
    return path
