"""`llama-chat` entry point."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    print("llama-chat: the chat app is not built yet; `python -m model --help` runs the model today.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
