"""The engine behind a session: the chat model and the guard, each local or on a server (config backend),
chosen here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass

from app.config import Config
from app.errors import SessionError
from guard.moderator import Moderator
from model.backend import ChatBackend
from model.errors import LlamaChatError


@dataclass
class Engine:
    """The chat model and (unless turned off) the guard, each local or on a server."""

    runner: ChatBackend
    guard: Moderator | None
    model_name: str
    demo: bool = False

    @classmethod
    def load(cls, config: Config, *, use_guard: bool, demo: bool = False, progress=None,
             interactive: bool = False) -> "Engine":
        """Load (or connect to) both models; a guard that cannot load stops everything (fail closed).
        `interactive`: a chat that lasts (the app): a local chat model runs in a process of its own
        (model.isolated), and compiling decode steps in the background pays off (model.compile auto)."""
        say = progress or (lambda msg: None)
        m = config.model
        ahead = child = None
        if m.backend == "local":
            try:
                from model.isolated import AVAILABLE, RunnerProcess

                if interactive and AVAILABLE:  # the model in a process of its own, loading while the guard does
                    say(f"Loading {m.source}…")
                    child = RunnerProcess.start(m.source, **local_args(config, interactive))
                else:  # the chat model's cached weights stream in while the guard loads
                    from model.runner import prefetch_weights

                    ahead = prefetch_weights(m.source, device=m.device, quantize=m.quantize)
            except LlamaChatError:
                pass  # loading it again below reports it, after the guard
        try:
            guard = None
            if use_guard:
                where = f" at {config.guard.base_url}" if config.guard.backend == "openai" else ""
                say(f"Loading Llama Guard ({config.guard.source}){where}…")
                guard = load_guard(config, progress=say)
            if child is not None:
                runner, child = child.wait_ready(say), None
            else:
                runner = load_chat(config, interactive=interactive, progress=say, prefetched=ahead)
        finally:
            if ahead is not None:
                ahead.cancel()  # the guard failed, or the read is done
            if child is not None:
                child.close()  # the guard failed
        return cls(runner, guard, runner.name, demo)


def load_chat(config: Config, *, interactive: bool = False, progress=None, prefetched=None) -> ChatBackend:
    m, say = config.model, progress or (lambda msg: None)
    if m.backend == "openai":
        from model.remote import RemoteChat

        say(f"Connecting to {m.base_url}…")
        return RemoteChat.connect(m.base_url, tokenizer=m.source, served_model=m.served_model,
                                  api_key_env=m.api_key_env, context_window=m.context or None)
    from model.runner import Runner

    say(f"Loading {m.source}…")
    return Runner.load(m.source, progress=say, prefetched=prefetched, **local_args(config, interactive))


def local_args(config: Config, interactive: bool) -> dict:
    """`Runner.load`'s arguments from the config. Quantized weights and compiled code go to the app's cache
    folder (model.host.app_cache_folder)."""
    m = config.model
    return dict(device=m.device, dtype=m.dtype, context_window=m.context or None, quantize=m.quantize,
                compile=wants_compile(config, interactive))


def wants_compile(config: Config, interactive: bool) -> bool:
    from model.device import pick_device

    mode = config.model.compile
    return mode == "on" or (mode == "auto" and interactive and pick_device(config.model.device) == "cpu")


def guard_settings(config: Config):
    """The guard's GuardSettings from the config (the probe check's record is keyed by them too)."""
    from guard.moderator import GuardSettings

    g = config.guard
    return GuardSettings(threshold=g.threshold, excluded=tuple(g.excluded), token_budget=g.token_budget)


def load_guard(config: Config, progress=None) -> Moderator:
    g = config.guard
    try:
        settings = guard_settings(config)
        if g.backend == "openai":
            from guard.remote import RemoteGuard

            return RemoteGuard.connect(g.base_url, tokenizer=g.source, served_model=g.served_model,
                                       api_key_env=g.api_key_env, settings=settings)
        from guard.classifier import Guard

        return Guard.load(g.source, device=config.model.device, precision=g.precision, progress=progress,
                          settings=settings)
    except (LlamaChatError, ValueError) as e:
        raise SessionError(
            f"Llama Guard could not be loaded, so llama-chat will not answer.\n{getattr(e, 'message', e)}\n"
            "To chat without screening, pass --no-guard (or set guard.enabled = false); replies are then "
            "marked unguarded.",
            title="Guard unavailable", exit_code=getattr(e, "exit_code", None),
        ) from e
