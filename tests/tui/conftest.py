"""Helpers for driving the app under Pilot."""

from __future__ import annotations

import asyncio
import gc

import pytest

from app.config import Config


@pytest.fixture(autouse=True)
def thawed():
    """An app that ends while its turn still runs does not detach its engine (the worker may still use it),
    so the objects app.workspace.attach froze stay frozen, as suits a process that is ending; the next test
    starts with none frozen."""
    yield
    gc.unfreeze()


@pytest.fixture
def present_model(tmp_path):
    """A folder that looks like a downloaded checkpoint, so the first-run screen stays away."""
    folder = tmp_path / "Llama-3.2-1B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def make_config(source, *, guard=True, mode="strict", max_new_tokens=256) -> Config:
    c = Config()
    c.model.source = str(source)
    c.guard.enabled = guard
    c.guard.mode = mode
    c.guard.check_every = 4
    c.generation.temperature = 0.0
    c.generation.max_new_tokens = max_new_tokens
    return c


async def wait_for(pilot, predicate, timeout=60.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.05)


def run(coro):
    return asyncio.run(coro)
