"""The app never makes you wait for it (issue 19): queued sends, a live status bar, quitting mid-reply."""

from __future__ import annotations

import threading

from app.errors import SessionError
from app.history import History
from app.tui.app import LlamaChatApp
from app.tui.widgets import MessageView, PromptArea
from tests.helpers.scripted import ScriptedRunner, scripted_loader
from tests.tui.conftest import make_config, run, wait_for


def gated_loader(gate: threading.Event, runner=None, fail: bool = False):
    """Loads (the scripted engine) only once `gate` is set, as a slow first load would; or fails then."""
    load = scripted_loader(runner)

    def slow(config, *, demo, progress):
        progress("loading…")
        gate.wait(30)
        if fail:
            raise SessionError("Llama Guard could not be loaded, so llama-chat will not answer.")
        return load(config, demo=demo, progress=progress)

    return slow


def status(app) -> str:
    return str(app.query_one("#status").render())


def unguarded_app(present_model, runner, *, max_new_tokens: int):
    return LlamaChatApp(make_config(present_model, guard=False, max_new_tokens=max_new_tokens),
                        engine_loader=scripted_loader(runner), animate=False)


async def send(pilot, app, text: str) -> None:
    """Once the engine is ready, type `text` and press Enter."""
    await wait_for(pilot, lambda: app.session.engine is not None)
    app.query_one("#prompt", PromptArea).text = text
    await pilot.press("enter")


def test_a_message_sent_while_loading_is_queued_and_goes_out_when_ready(present_model):
    gate, runner = threading.Event(), ScriptedRunner()

    async def go():
        app = LlamaChatApp(make_config(present_model), engine_loader=gated_loader(gate, runner), animate=False)
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            prompt = app.query_one("#prompt", PromptArea)
            prompt.text = "Capital of France?"
            await pilot.press("enter")
            assert app.queued == "Capital of France?" and prompt.read_only and "Queued" in prompt.border_title
            assert prompt.text == "Capital of France?" and runner.prompts == []
            await pilot.press("x")  # a queued message cannot be changed by accident
            assert prompt.text == "Capital of France?"
            gate.set()
            await wait_for(pilot, lambda: len(list(app.query(MessageView))) == 2 and not app.busy)
            assert runner.prompts[0][-1]["content"] == "Capital of France?"
            assert app.queued is None and not prompt.read_only and prompt.text == ""

    run(go())


def test_esc_takes_a_queued_message_back_and_a_failed_load_returns_it(present_model):
    async def go():
        gate = threading.Event()
        app = LlamaChatApp(make_config(present_model), engine_loader=gated_loader(gate, fail=True), animate=False)
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            prompt = app.query_one("#prompt", PromptArea)
            prompt.text = "First try"
            await pilot.press("enter")
            assert app.queued == "First try"
            await pilot.press("escape")
            assert app.queued is None and not prompt.read_only and prompt.text == "First try"
            await pilot.press("end", "!", "enter")
            assert app.queued == "First try!"
            gate.set()  # the load fails: the message comes back for editing, never sent
            await wait_for(pilot, lambda: app.queued is None)
            assert prompt.text == "First try!" and not prompt.read_only and not list(app.query(MessageView))
            assert any("did not load" in n.message for n in app._notifications)

    run(go())


def test_a_message_sent_during_a_reply_is_queued_behind_it(present_model):
    runner = ScriptedRunner(reply="word " * 300, delay=0.02)

    async def go():
        app = LlamaChatApp(make_config(present_model, guard=False), engine_loader=scripted_loader(runner),
                           animate=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            prompt = app.query_one("#prompt", PromptArea)
            prompt.text = "One"
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.busy)
            prompt.text = "Two"
            await pilot.press("enter")
            assert app.queued == "Two" and "the reply above ends" in prompt.border_title
            await wait_for(pilot, lambda: len(runner.prompts) == 2 and not app.busy)
            assert [m["content"] for m in runner.prompts[1] if m["role"] == "user"] == ["One", "Two"]

    run(go())


def test_the_status_bar_changes_while_a_reply_streams(present_model):
    runner = ScriptedRunner(reply="word " * 200, delay=0.02)

    async def go():
        app = unguarded_app(present_model, runner, max_new_tokens=400)
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, app, "Go")
            seen = set()
            while app.busy or not seen:
                if app.busy:
                    seen.add(status(app))
                await pilot.pause(0.05)
            contexts = {s.split("ctx ")[1].split(" ")[0] for s in seen if "ctx " in s}
            assert len(contexts) >= 3, seen  # the context used grows during the reply, not only at its end

    run(go())


def test_the_cursor_rests_while_a_reply_streams(present_model):
    """On a CPU that the model's threads fill, each wake-up of the UI slows decoding: the prompt's cursor
    does not blink (two repaints a second) while a reply streams, and blinks again after it."""
    runner = ScriptedRunner(reply="word " * 200, delay=0.01)

    async def go():
        app = LlamaChatApp(make_config(present_model, guard=False, max_new_tokens=400),
                           engine_loader=scripted_loader(runner), animate=True)
        async with app.run_test(size=(100, 30)) as pilot:
            prompt = app.query_one("#prompt", PromptArea)
            assert prompt.cursor_blink
            await send(pilot, app, "Go")
            blinking = set()
            while app.busy or not blinking:
                if app.busy:
                    blinking.add(prompt.cursor_blink)
                await pilot.pause(0.02)
            assert blinking == {False} and prompt.cursor_blink

    run(go())


def test_the_status_bar_says_when_a_check_runs(present_model):
    from tests.helpers.scripted import ScriptedGuard

    class SlowGuard(ScriptedGuard):
        def check(self, messages, **kw):
            threading.Event().wait(0.4)
            return super().check(messages, **kw)

    async def go():
        app = LlamaChatApp(make_config(present_model), engine_loader=scripted_loader(ScriptedRunner(), SlowGuard()),
                           animate=False)
        async with app.run_test(size=(120, 30)) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            app.query_one("#prompt", PromptArea).text = "Hi"
            await pilot.press("enter")
            await wait_for(pilot, lambda: "checking your message" in status(app), timeout=10)

    run(go())


def test_quitting_mid_reply_stops_it_and_stores_it_stopped(present_model):
    """Issue 19, bug 1: Ctrl+Q during a reply blanked the screen while generation went on, then stored the
    reply as complete."""
    runner = ScriptedRunner(reply="word " * 2000, delay=0.01)

    async def go():
        app = unguarded_app(present_model, runner, max_new_tokens=4000)
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, app, "Write an essay")
            await wait_for(pilot, lambda: app.reply_view is not None and len(app.reply_view.text) > 50)
            await pilot.press("ctrl+q")
        return app

    app = run(go())
    reply = History(app.session.browse.path).messages(app.session.conversation_id)[-1]
    assert reply.status == "stopped" and 50 < len(reply.content) < len(runner.reply)


def test_verdicts_of_a_blocked_reply_show_every_check_once(present_model):
    """Issue 19, bug 3: Ctrl+G on a blocked reply listed the blocking verdict twice and none of the passed
    checks; it shows what is stored."""
    from app.tui.screens import VerdictScreen
    from tests.helpers.scripted import KEYWORD, ScriptedGuard

    runner = ScriptedRunner(reply="A calm and harmless sentence. " * 4 + f"Then the {KEYWORD} part follows.")

    async def go():
        app = LlamaChatApp(make_config(present_model), engine_loader=scripted_loader(runner, ScriptedGuard()),
                           animate=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            app.query_one("#prompt", PromptArea).text = "Say something"
            await pilot.press("enter")
            await wait_for(pilot, lambda: not app.busy and list(app.query(MessageView))[-1].status == "blocked")
            stored = app.session.browse.messages(app.session.conversation_id)[-1].verdicts
            assert [v["safe"] for v in stored][-1] is False and len(stored) >= 3
            await pilot.press("ctrl+g")
            assert isinstance(app.screen, VerdictScreen)
            assert [(v["safe"], v["score"]) for v in app.screen.verdicts] == [(v["safe"], v["score"]) for v in stored]

    run(go())


def test_your_own_messages_are_shown_as_typed(present_model):
    """Issue 19, bug 6: user text went through Markdown: `__init__` and `a*b*c` lost characters, HTML was
    stripped, single newlines merged."""
    text = "def __init__(self): a*b*c <b>bold</b>\nsecond line\n  indented"

    async def go():
        app = LlamaChatApp(make_config(present_model, guard=False), engine_loader=scripted_loader(), animate=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            app.query_one("#prompt", PromptArea).text = text
            await pilot.press("enter")
            await wait_for(pilot, lambda: not app.busy and len(list(app.query(MessageView))) == 2)
            user = list(app.query(MessageView))[0]
            lines = [line.rstrip() for line in str(user.body.render()).splitlines()]
            assert lines == text.splitlines()
            app.open_conversation(app.session.conversation_id)  # and when the chat is opened again
            await pilot.pause(0.1)
            user = list(app.query(MessageView))[0]
            assert [line.rstrip() for line in str(user.body.render()).splitlines()] == text.splitlines()

    run(go())


def test_new_lines_typed_quickly_land_where_they_were_typed(present_model):
    """Issue 19, bug 7: `AAA` Ctrl+J `BBB` Ctrl+J `CCC` typed quickly gave `AAABBB⏎⏎CCC`."""
    async def go():
        app = LlamaChatApp(make_config(present_model), engine_loader=gated_loader(threading.Event()), animate=False)
        async with app.run_test(size=(100, 30)) as pilot:
            from textual import events

            keys = [*"AAA", "ctrl+j", *"BBB", "ctrl+j", *"CCC", "shift+enter", *"DD"]
            for key in keys:  # all at once, as a terminal delivers fast typing in one read
                app.post_message(events.Key(key, key if len(key) == 1 else None))
            await pilot.pause(0.3)
            assert app.query_one("#prompt", PromptArea).text == "AAA\nBBB\nCCC\nDD"

    run(go())


def test_focus_returns_to_the_message_box_and_toasts_leave_it_visible(present_model):
    """Issue 19, bug 11: after a dialog, focus could land on the chat list, where typed letters open rename,
    delete or export; toasts covered the message box."""
    from app.tui.conversations import ConversationList
    from app.tui.screens import AboutScreen

    async def go():
        app = LlamaChatApp(make_config(present_model, guard=False), engine_loader=scripted_loader(), animate=False)
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            app.query_one("#prompt", PromptArea).text = "Hello"
            await pilot.press("enter")
            await wait_for(pilot, lambda: not app.busy and app.query_one(ConversationList).option_count == 1)
            app.query_one(ConversationList).focus()
            await pilot.press("f1")
            assert isinstance(app.screen, AboutScreen)
            await pilot.press("escape")
            await pilot.pause(0.1)
            assert isinstance(app.focused, PromptArea)
            await pilot.press("d")  # a letter typed now is text, not "delete"
            assert app.screen is app.screen_stack[0] and app.query_one("#prompt", PromptArea).text == "d"
            app.notify("A long notification that would sit on the message box")
            await pilot.pause(0.3)
            prompt = app.query_one("#prompt", PromptArea).region
            toasts = [t.region for t in app.query("Toast")]
            assert toasts and not any(t.overlaps(prompt) for t in toasts)

    run(go())


def test_a_search_result_opens_at_the_matching_message(present_model):
    """Issue 19, bug 8: `Pari` found nothing (prefixes now match) and a result opened at the bottom."""
    from app.tui.conversations import ConversationList

    history = History()
    cid = history.create_conversation("Trip planning")
    for i in range(40):
        text = "What should I see in Paris?" if i == 4 else f"Message {i} about trains and timetables."
        history.add_message(cid, "user" if i % 2 == 0 else "assistant", text)
    history.close()

    async def go():
        app = LlamaChatApp(make_config(present_model, guard=False), engine_loader=scripted_loader(), animate=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("ctrl+f", *"pari")
            listing = app.query_one(ConversationList)
            await wait_for(pilot, lambda: listing.option_count == 1)
            listing.focus()
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.focused, MessageView))
            await pilot.pause(0.2)
            match, transcript = app.focused, app.query_one("#transcript")
            assert "Paris" in match.text
            assert transcript.region.contains_region(match.region) or match.region.y >= transcript.region.y
            assert match.region.y < transcript.region.bottom  # on screen, not scrolled off to the end
            assert transcript.scroll_y < transcript.max_scroll_y

    run(go())


def test_copying_claims_only_what_happened(present_model, tmp_path, monkeypatch):
    """Issue 19, bug 10: "Code block copied" was said where the terminal ignores OSC 52 (tmux's default)."""
    import os
    import stat

    from app.paths import data_dir

    for name in ("DISPLAY", "WAYLAND_DISPLAY", "TMUX"):
        monkeypatch.delenv(name, raising=False)
    tools = tmp_path / "bin"
    tools.mkdir()
    monkeypatch.setenv("PATH", str(tools))  # no clipboard tool anywhere

    async def go():
        app = LlamaChatApp(make_config(present_model, guard=False), engine_loader=scripted_loader(), animate=False)
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            app.query_one("#prompt", PromptArea).text = "Code please"
            await pilot.press("enter")
            await wait_for(pilot, lambda: not app.busy and len(list(app.query(MessageView))) == 2)
            app.action_copy_code()
            await pilot.pause(0.1)
            saved = data_dir() / "clipboard.txt"
            (note,) = [n.message for n in app._notifications if "Code block" in n.message]
            assert "may ignore" in note and str(saved) in note and "copied" not in note
            assert saved.read_text() == "print({'France': 'Paris'}['France'])\n"
            assert stat.S_IMODE(saved.stat().st_mode) == 0o600
            # With a clipboard tool (here a stand-in for xclip that keeps what it is given), it is used and named.
            fake = tools / "xclip"
            fake.write_text(f"#!/bin/sh\nexec /bin/cat > {tmp_path / 'got'}\n")
            fake.chmod(0o755)
            monkeypatch.setenv("DISPLAY", ":0")
            app.action_copy_reply()
            await pilot.pause(0.1)
            assert "Reply copied to the clipboard (xclip)." in [n.message for n in app._notifications]
            assert (tmp_path / "got").read_text() == list(app.query(MessageView))[-1].text
            assert os.environ["PATH"] == str(tools)

    run(go())


def test_a_failed_download_offers_a_retry_and_the_demo(monkeypatch):
    """Issue 19, bug 2: offline, Download failed with no retry and no way back to the demo, and a message
    then got "The model is still loading"."""
    from app.tui.screens import FirstRunScreen

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as a machine without network: the Hub cannot be reached

    async def go():
        app = LlamaChatApp(make_config("meta-llama/Llama-3.2-1B-Instruct"), engine_loader=scripted_loader(),
                           animate=False)
        app.session.demo_available = lambda: True
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, FirstRunScreen))
            await pilot.click("#download")
            await wait_for(pilot, lambda: isinstance(app.screen, FirstRunScreen) and app.screen.problem)
            assert "download failed" in app.screen.problem.lower()
            assert app.screen.query("#demo") and "again" in str(app.screen.query_one("#download").label)
            await pilot.click("#demo")  # the way back to the demo
            await wait_for(pilot, lambda: app.session.engine is not None)
            assert app.demo and app.config.generation.repetition_penalty == 1.1  # with the demo's sampling

    run(go())


def test_settings_errors_and_buttons_show_in_a_small_window_and_models_stay_listed(present_model):
    """Issue 19, bugs 4 and 5: an invalid value made Apply silently do nothing (its error line was below the
    visible area; at 60x20 the buttons were not drawn), and a failed model switch removed the model that
    had loaded from the list."""
    from textual.widgets import Input, Select

    from app.tui.screens import SettingsScreen

    def loader(config, *, demo, progress):
        if config.model.source == "/no/such/model":
            raise SessionError("The model /no/such/model was not found.")
        return scripted_loader()(config, demo=demo, progress=progress)

    async def go():
        app = LlamaChatApp(make_config(present_model), engine_loader=loader, animate=False)
        async with app.run_test(size=(60, 20), notifications=True) as pilot:
            await wait_for(pilot, lambda: app.session.engine is not None)
            await pilot.press("f2")
            assert isinstance(app.screen, SettingsScreen)
            screen_region = app.screen.region
            for button in ("#apply", "#cancel"):
                region = app.screen.query_one(button).region
                assert region.height and screen_region.contains_region(region), (button, region)
            app.screen.query_one("#top_p", Input).value = "0"
            app.screen.query_one("#apply").press()
            await pilot.pause(0.1)
            error = app.screen.query_one("#error")
            assert "top p must be between" in str(error.render()) and screen_region.contains_region(error.region)
            app.screen.query_one("#top_p", Input).value = ""
            app.screen.query_one("#repetition_penalty", Input).value = "1.2"
            app.screen.query_one("#model-path", Input).value = "/no/such/model"
            app.screen.query_one("#apply").press()
            await wait_for(pilot, lambda: app.loading_text == "not loaded")
            assert app.config.generation.repetition_penalty == 1.2
            await pilot.press("f2")
            sources = [value for _label, value in app.screen.query_one("#model", Select)._options]
            assert str(present_model) in sources

    run(go())
