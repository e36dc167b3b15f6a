"""The app's flows under Pilot: real tiny models where the text matters, scripted ones where it does not."""

from __future__ import annotations

import pytest

import app.tui.app as tui_app
from app.tui.app import LlamaChatApp
from app.tui.screens import AboutScreen, FirstRunScreen, SystemPromptScreen, VerdictScreen
from app.tui.widgets import MessageView, PromptArea
from tests.helpers.scripted import KEYWORD, ScriptedRunner, scripted_loader
from tests.tui.conftest import make_config, run, wait_for


def views(app):
    return list(app.query(MessageView))


async def send(pilot, app, text):
    prompt = app.query_one("#prompt", PromptArea)
    prompt.focus()
    prompt.text = text
    await pilot.press("enter")
    await wait_for(pilot, lambda: not app.busy and views(app) and views(app)[-1].status != "streaming")


def real_loader(runner, guard):
    from app.session import Engine

    def load(config, *, demo, progress):
        runner.reset()
        return Engine(runner, guard if config.guard.enabled else None, "tiny-llama", demo)

    return load


@pytest.mark.slow
def test_send_streams_a_screened_reply_and_lists_the_chat(present_model, tiny_runner, tiny_guard):
    async def go():
        config = make_config(present_model, max_new_tokens=24)
        app = LlamaChatApp(config, engine_loader=real_loader(tiny_runner, tiny_guard), animate=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            assert app.guard_state == "on fp32"  # the tiny guard, unquantized
            await send(pilot, app, "Tell me about bread.")
            user, reply = views(app)
            assert user.text == "Tell me about bread." and user.verdicts[0]["safe"] and user.message_id
            assert reply.status == "complete" and reply.text and reply.verdicts[-1]["safe"]
            assert reply.text == app.session.browse.messages(app.session.conversation_id)[-1].content
            assert "✓ passed" in str(reply.query_one(".badge").render())
            assert app.query_one("#conversations").option_count == 1
            assert "tok/s" in str(app.query_one("#status").render())
            assert app.query_one("#prompt", PromptArea).text == ""

    run(go())


@pytest.mark.slow
def test_blocked_input_shows_a_refusal_and_never_runs_the_model(present_model, tiny_runner, tiny_guard):
    async def go():
        config = make_config(present_model, max_new_tokens=24)
        app = LlamaChatApp(config, engine_loader=real_loader(tiny_runner, tiny_guard), animate=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            tiny_runner.last_stats = None
            await send(pilot, app, f"Where can I buy a {KEYWORD}?")
            user, reply = views(app)
            assert user.status == "blocked" and "blocked: Violent Crimes" in str(user.query_one(".badge").render())
            assert reply.has_class("refusal") and "Blocked by Llama Guard (Violent Crimes)" in reply.text
            assert tiny_runner.last_stats is None
            await pilot.press("ctrl+g")  # the details of the latest decision
            assert isinstance(app.screen, VerdictScreen)

    run(go())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["strict", "fast"])
def test_blocked_reply_strict_and_retracted_reply_fast(present_model, keyword_runner, tiny_guard, mode):
    async def go():
        app = LlamaChatApp(make_config(present_model, mode=mode, max_new_tokens=24),
                           engine_loader=real_loader(keyword_runner, tiny_guard),
                           animate=False)
        seen = []
        async with app.run_test(size=(100, 30), message_hook=seen.append) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            await send(pilot, app, "Say something.")
            reply = views(app)[-1]
            assert reply.status == "blocked" and KEYWORD not in reply.text and "Blocked by Llama Guard" in reply.text
            released = "".join(m.event.text for m in seen if type(m).__name__ == "TurnEvent"
                               and type(m.event).__name__ == "Released")
            retracted = [m for m in seen if type(m).__name__ == "TurnEvent" and type(m.event).__name__ == "Retracted"]
            if mode == "fast":
                assert KEYWORD in released and retracted  # shown, then visibly replaced by the refusal
            else:
                assert KEYWORD not in released and not retracted

    run(go())


@pytest.mark.slow
def test_escape_stops_a_long_reply_and_keeps_it(present_model, tiny_runner):
    async def go():
        app = LlamaChatApp(make_config(present_model, guard=False, max_new_tokens=3000),
                           engine_loader=real_loader(tiny_runner, None), animate=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            assert app.query_one("#banner").display  # unguarded, said the whole time
            prompt = app.query_one("#prompt", PromptArea)
            prompt.text = "Go on forever."
            await pilot.press("enter")
            await wait_for(pilot, lambda: len(views(app)) == 2 and len(views(app)[-1].text) > 20)
            await pilot.press("escape")
            await wait_for(pilot, lambda: not app.busy)
            reply = views(app)[-1]
            assert reply.status == "stopped" and "stopped" in str(reply.query_one(".badge").render())
            stored = app.session.browse.messages(app.session.conversation_id)[-1]
            assert stored.status == "stopped" and stored.content == reply.text and stored.stats["new_tokens"] < 3000

    run(go())


def test_edit_regenerate_search_and_reopen(present_model):
    runner = ScriptedRunner()

    async def go():
        app = LlamaChatApp(make_config(present_model), engine_loader=scripted_loader(runner), animate=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            await send(pilot, app, "First question about rivers")
            await send(pilot, app, "Second question")
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: not app.busy and views(app)[-1].status == "complete")
            assert len(views(app)) == 4 and len(runner.prompts) == 3
            await pilot.press("ctrl+e")
            assert app.query_one("#prompt", PromptArea).text == "Second question"
            app.query_one("#prompt", PromptArea).text = "Edited question"
            await pilot.press("enter")
            await wait_for(pilot, lambda: not app.busy and views(app)[-1].status == "complete")
            assert [v.text for v in views(app) if v.role == "user"] == ["First question about rivers", "Edited question"]
            assert [m.content for m in app.session.browse.messages(app.session.conversation_id) if m.role == "user"] == [
                "First question about rivers", "Edited question"]
            await pilot.press("ctrl+n")
            assert views(app) == []
            await send(pilot, app, "Another chat")
            listing = app.query_one("#conversations")
            assert listing.option_count == 2
            await pilot.press("ctrl+f")
            await pilot.press(*"rivers")
            await wait_for(pilot, lambda: listing.option_count == 1)
            listing.focus()
            listing.highlighted = 0
            await pilot.press("enter")
            await wait_for(pilot, lambda: len(views(app)) == 4)
            assert views(app)[0].text == "First question about rivers"

    run(go())


def test_system_prompt_change_reaches_the_model(present_model):
    runner = ScriptedRunner()

    async def go():
        app = LlamaChatApp(make_config(present_model), engine_loader=scripted_loader(runner), animate=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            await pilot.press("ctrl+s")
            assert isinstance(app.screen, SystemPromptScreen)
            from textual.widgets import TextArea

            app.screen.query_one("#text", TextArea).text = "You are a pirate."
            await pilot.click("#apply")
            await send(pilot, app, "Hello")
            assert runner.prompts[-1][0] == {"role": "system", "content": "You are a pirate."}
            assert app.session.browse.get_conversation(app.session.conversation_id).system_prompt == "You are a pirate."

    run(go())


def test_about_from_the_command_palette(present_model):
    async def go():
        app = LlamaChatApp(make_config(present_model), engine_loader=scripted_loader(), animate=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("ctrl+p")
            await pilot.press(*"about")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, AboutScreen))
            text = " ".join(str(m._markdown) for m in app.screen.query("Markdown"))
            assert "Built with Llama" in text
            assert "Llama 3.2 is licensed under the Llama 3.2 Community License, Copyright © Meta Platforms, Inc. " \
                   "All Rights Reserved." in text

    run(go())


def test_typed_text_survives_a_send_before_the_model_is_ready(present_model):
    import threading

    gate = threading.Event()

    def slow_loader(config, *, demo, progress):
        gate.wait(10)
        return scripted_loader()(config, demo=demo, progress=progress)

    async def go():
        app = LlamaChatApp(make_config(present_model), engine_loader=slow_loader, animate=False)
        async with app.run_test(size=(80, 24)) as pilot:
            app.query_one("#prompt", PromptArea).text = "keep me"
            await pilot.press("enter")
            assert app.query_one("#prompt", PromptArea).text == "keep me" and views(app) == []
            assert "loading" in str(app.query_one("#status").render())
            gate.set()
            await wait_for(pilot, lambda: app.session.engine is not None)

    run(go())


def test_first_run_without_a_model_offers_download_and_demo(tmp_path):
    async def go():
        app = LlamaChatApp(make_config("meta-llama/Llama-3.2-1B-Instruct"), engine_loader=scripted_loader(),
                           animate=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.2)
            assert isinstance(app.screen, FirstRunScreen)
            assert app.screen.query("#download")

    run(go())


def test_load_failure_is_reported_and_the_app_stays_usable(present_model):
    from app.errors import SessionError

    def failing(config, *, demo, progress):
        raise SessionError("Llama Guard could not be loaded, so llama-chat will not answer.", title="Guard unavailable")

    async def go():
        app = LlamaChatApp(make_config(present_model), engine_loader=failing, animate=False)
        async with app.run_test(size=(80, 24), notifications=True) as pilot:
            await wait_for(pilot, lambda: app.guard_state == "error")
            assert any("could not be loaded" in n.message for n in app._notifications)
            await pilot.press("f1")
            assert isinstance(app.screen, AboutScreen)

    run(go())


def test_export_never_overwrites_is_owner_only_and_reports_failures(present_model):
    import stat

    from app.paths import data_dir

    async def go():
        app = LlamaChatApp(make_config(present_model), engine_loader=scripted_loader(), animate=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            await send(pilot, app, "Tell me about Paris")
            exports = data_dir() / "exports"
            (exports / "conversation-1.md").mkdir(parents=True)  # a folder in the way of the first name
            app.action_export_conversation()
            app.action_export_conversation()  # again: new names, the first export kept
            names = sorted(p.name for p in exports.iterdir() if p.is_file())
            assert names == sorted(["conversation-1-2.md", "conversation-1.json",  # the first export
                                    "conversation-1-3.md", "conversation-1-2.json"])  # the second
            assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in exports.iterdir() if p.is_file())
            assert "Paris" in (exports / "conversation-1-2.md").read_text()
            for p in list(exports.iterdir()):
                p.rmdir() if p.is_dir() else p.unlink()
            exports.rmdir()
            exports.write_text("not a folder")  # the export folder cannot be made
            app.action_export_conversation()
            await pilot.pause(0.1)
            assert exports.read_text() == "not a folder"
            assert any(n.title == "Export failed" and "Nothing was overwritten" in n.message
                       for n in app._notifications)

    run(go())


def test_a_damaged_history_opens_with_a_notice_and_recovers_in_place(present_model):
    """Issue 20, item 4: the window opens on a damaged file, says so, stores nothing, and recovers it."""
    from app.paths import database_file
    from app.tui.screens import ConfirmScreen
    from tests.app.test_history import damage, filled_history

    path = database_file()
    filled_history(path, conversations=12)
    damage(path, "page")

    async def go():
        app = LlamaChatApp(make_config(present_model), engine_loader=scripted_loader(), animate=False)
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            assert str(path) in app.screen.question and "is damaged" in app.screen.question
            assert app.query_one("#conversations").option_count == 0 and app.session.browse.read_only
            await pilot.click("#yes")
            await wait_for(pilot, lambda: app.query_one("#conversations").option_count == 12)
            assert any("Recovered 12 conversations" in n.message for n in app._notifications)
            assert [p for p in path.parent.iterdir() if ".damaged-" in p.name]
            await wait_for(pilot, lambda: app.session.engine is not None)
            await send(pilot, app, "Tell me about Paris")  # stored in the recovered file
            assert app.session.history.get_conversation(app.session.conversation_id).messages[-1].status == "complete"

    run(go())


def test_esc_cancels_the_input_check(present_model):
    """Issue 20, item 9: Esc while the guard screens the message stops the check; nothing is sent."""
    import threading

    from guard.classifier import CheckCancelled
    from tests.helpers.scripted import ScriptedGuard

    class SlowGuard(ScriptedGuard):  # the real guard's contract: a set cancel event raises CheckCancelled
        started = threading.Event()

        def check(self, messages, *, stage=None, cancel=None):
            self.started.set()
            if stage == "input" and cancel is not None and cancel.wait(30):
                raise CheckCancelled("cancelled")
            return super().check(messages, stage=stage)

    runner, guard = ScriptedRunner(), SlowGuard()

    async def go():
        app = LlamaChatApp(make_config(present_model), engine_loader=scripted_loader(runner, guard), animate=False)
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            prompt = app.query_one("#prompt", PromptArea)
            prompt.text = "A long question"
            await pilot.press("enter")
            await wait_for(pilot, lambda: guard.started.is_set())
            await pilot.press("escape")
            await wait_for(pilot, lambda: not app.busy)
            (user,) = views(app)
            assert user.status == "stopped" and "not screened" in str(user.query_one(".badge").render())
            assert prompt.text == "A long question" and runner.prompts == []  # kept to resend; the model never ran
            assert app.session.browse.messages(app.session.conversation_id)[0].status == "stopped"

    run(go())


def test_a_turn_stored_elsewhere_is_shown_before_the_next_one(present_model):
    """Issue 20, item 2: `ask --conversation ID` while the window has it open: the window says so and shows
    that turn; the model gets both turns, each question with its own answer."""
    from app.history import History

    runner = ScriptedRunner(reply="Noted.")

    async def go():
        app = LlamaChatApp(make_config(present_model, guard=False), engine_loader=scripted_loader(runner),
                           animate=False)
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            await send(pilot, app, "First, here")
            other = History(app.session.browse.path)  # another process's connection
            q = other.add_message(app.session.conversation_id, "user", "Asked elsewhere")
            other.add_message(app.session.conversation_id, "assistant", "Answered elsewhere", parent_id=q)
            await send(pilot, app, "Second, here")
            assert any("changed elsewhere" in n.message for n in app._notifications)
            assert [v.text for v in views(app)] == ["First, here", "Noted.", "Asked elsewhere", "Answered elsewhere",
                                                    "Second, here", "Noted."]
            assert [m["content"] for m in runner.prompts[-1]][-3:] == ["Asked elsewhere", "Answered elsewhere",
                                                                      "Second, here"]

    run(go())


QUIT_DRIVER = """
import threading
from app.config import load_config
from app.tui.app import LlamaChatApp
from model.compiled import exit_process

def never_done(config, *, demo, progress):  # background work that would take forever
    progress("loading forever…")
    threading.Event().wait()

LlamaChatApp(load_config(), engine_loader=never_done).run()
exit_process(0)
"""


@pytest.mark.slow
def test_quit_never_waits_for_background_work(present_model, tmp_path):
    """Issue 20, item 7, in a real process on a real terminal: Ctrl+Q while a worker is busy ends the
    process at once (it waited for the worker: a compile, a load, a long check)."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    env = {**os.environ, "LLAMA_CHAT_MODEL_SOURCE": str(present_model), "LLAMA_CHAT_GUARD_ENABLED": "false",
           "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    main, child = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", QUIT_DRIVER], stdin=child, stdout=child, stderr=child, env=env,
                         close_fds=True)
    os.close(child)
    seen, deadline = b"", time.monotonic() + 60
    while b"loading forever" not in seen and time.monotonic() < deadline:
        if select.select([main], [], [], 0.2)[0]:
            seen += os.read(main, 65536)
    assert b"loading forever" in seen, "the app never drew"
    os.write(main, b"\x11")  # Ctrl+Q
    try:
        code = p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError("Ctrl+Q did not end the app: it waited for the background worker") from None
    finally:
        os.close(main)
    assert code == 0


def test_a_streamed_frame_is_laid_out_once_and_the_transcript_follows_it(present_model, monkeypatch):
    """Each frame grows the reply; the layout that follows places everything. Textual's virtual_size
    reactive asked for a second, idle layout of the whole screen per frame (placed() in widgets.py)."""
    from textual.screen import Screen

    layouts = []
    original = Screen._refresh_layout

    def counted(self, *args, **kwargs):
        layouts.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Screen, "_refresh_layout", counted)
    # frames as often as the pacing allows, so that a second layout per frame stands out from the turn's own
    monkeypatch.setattr(tui_app, "UI_SHARE_CPU", 1.0)
    monkeypatch.setattr(tui_app, "MAX_FRAME_S", 0.2)
    frames = []

    async def go():
        runner = ScriptedRunner(reply=" ".join(f"word{i}" for i in range(2500)), rate=400)
        config = make_config(present_model, guard=False, max_new_tokens=3000)
        app = LlamaChatApp(config, engine_loader=scripted_loader(runner), animate=False)
        original_pace = app.pace_frames
        app.pace_frames = lambda: (frames.append(1), original_pace())
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            before = len(layouts), len(frames)
            await send(pilot, app, "Count.")
            await pilot.pause(0.2)
            laid, shown = len(layouts) - before[0], len(frames) - before[1]
            assert shown >= 15
            # was two a frame; 8 for the turn's start and end
            assert laid <= shown + 8, f"{laid} layouts for {shown} frames"
            transcript = app.query_one("#transcript")
            assert transcript.max_scroll_y > 0 and transcript.scroll_y == transcript.max_scroll_y

    run(go())
