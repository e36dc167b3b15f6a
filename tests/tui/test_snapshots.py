"""A snapshot of every screen at 80x24 (review the SVG diff before `--snapshot-update`).

Scripted model and guard keep the text, stats and verdicts fixed; cursor blink is off and versions
are pinned so snapshots change only when the UI does."""

from __future__ import annotations

import pytest

from app.tui.app import LlamaChatApp
from tests.helpers.scripted import KEYWORD, scripted_loader
from tests.tui.conftest import make_config, wait_for

VERSIONS = {"llama-chat": "0.1.0", "textual": "8.x", "torch": "2.x", "transformers": "5.x"}


class PinnedApp(LlamaChatApp):
    @staticmethod
    def versions():
        return VERSIONS


@pytest.fixture
def app(present_model):
    config = make_config(present_model)
    return PinnedApp(config, engine_loader=scripted_loader(), animate=False)


async def ready(pilot):
    app = pilot.app
    await wait_for(pilot, lambda: app.session.engine is not None)
    app.clear_notifications()
    await pilot.pause(0.1)


async def chatted(pilot):
    from app.tui.widgets import PromptArea

    await ready(pilot)
    app = pilot.app
    for text in ("What is the capital of France?", f"How do I use a {KEYWORD}?"):
        app.query_one("#prompt", PromptArea).text = text
        await pilot.press("enter")
        await wait_for(pilot, lambda: not app.busy)
    app.clear_notifications()
    await pilot.pause(0.2)


def test_main_screen_empty(snap_compare, app):
    assert snap_compare(app, run_before=ready)


def test_main_screen_with_conversation(snap_compare, app):
    assert snap_compare(app, run_before=chatted)


def test_about_screen(snap_compare, app):
    assert snap_compare(app, press=["f1"], run_before=ready)


def test_verdict_screen(snap_compare, app):
    assert snap_compare(app, press=["ctrl+g"], run_before=chatted)


def test_system_prompt_screen(snap_compare, app):
    assert snap_compare(app, press=["ctrl+s"], run_before=ready)


def test_settings_screen(snap_compare, app):
    assert snap_compare(app, press=["f2"], run_before=ready)


def test_delete_confirmation(snap_compare, app):
    async def before(pilot):
        await chatted(pilot)
        pilot.app.action_delete_conversation()

    assert snap_compare(app, run_before=before)


def test_rename_screen(snap_compare, app):
    async def before(pilot):
        await chatted(pilot)
        pilot.app.action_rename_conversation()

    assert snap_compare(app, run_before=before)


def test_first_run_screen(snap_compare):
    app = PinnedApp(make_config("meta-llama/Llama-3.2-1B-Instruct"), engine_loader=scripted_loader(), animate=False)
    assert snap_compare(app)


def test_unguarded_banner(snap_compare, present_model):
    app = PinnedApp(make_config(present_model, guard=False), engine_loader=scripted_loader(), animate=False)
    assert snap_compare(app, run_before=ready)
