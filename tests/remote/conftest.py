"""The two real vLLM servers of the remote-engine tests (started early: tests/conftest.py)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from tests.helpers.vllm import EARLY


@pytest.fixture(scope="session")
def vllm(tiny_guard_dir):
    if "python" not in EARLY:
        why = ("vLLM is not installed for the remote tests: make its virtualenv as .ci/run does "
               "(../shared/docs/recipes.md) or point LLAMA_CHAT_VLLM_PYTHON at its python")
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    ready_s = {role: round(EARLY[role].wait_ready(), 1) for role in ("chat", "guard")}
    print(f"\nvLLM servers up {ready_s} s after they started")
    return SimpleNamespace(chat=EARLY["chat"], guard=EARLY["guard"], chat_dir=EARLY["chat_dir"],
                           guard_dir=tiny_guard_dir, ready_s=ready_s)
