"""Settings: defaults < config.toml < environment (LLAMA_CHAT_<SECTION>_<KEY>) < command line.

Every field has a default and a docstring (its `doc` metadata). A bad file is refused with a message
naming the file, the key and what is expected; the file is never written by llama-chat.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import ConfigError
from app.paths import config_file
from model import QUANTIZE_MODES

DEFAULT_MODEL = "meta-llama/Llama-3.2-1B-Instruct"
DEFAULT_GUARD = "meta-llama/Llama-Guard-3-1B"


def _f(default, doc: str, check=None, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, "check": check}, **kw)
    return field(default=default, metadata={"doc": doc, "check": check}, **kw)


def _one_of(*options):
    return lambda v: None if v in options else f"one of {', '.join(map(repr, options))}"


def _between(lo, hi, *, lo_open=False, hi_open=False):
    def check(v):
        if v is None:
            return None
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else f"a number {'>' if lo_open else '>='} {lo} and {'<' if hi_open else '<='} {hi}"

    return check


def _at_least(lo):
    return lambda v: None if v is None or v >= lo else f"a whole number >= {lo}"


def _codes(v):
    from guard.categories import LLAMA_GUARD_3_8B_CATEGORIES

    bad = [c for c in v if c.upper() not in LLAMA_GUARD_3_8B_CATEGORIES]
    return f"category codes S1 to S14, like \"S6\" (not {', '.join(map(repr, bad))})" if bad else None


def _device(v):
    kind, _, index = v.partition(":")
    ok = v in ("auto", "cpu", "mps", "cuda") or (kind == "cuda" and index.isdigit())
    return None if ok else "auto, cpu, cuda, cuda:N or mps"


def _url(v):
    return None if v == "" or v.startswith(("http://", "https://")) else "an http:// or https:// address ending in /v1"


def _env_name(v):
    return None if v == "" or v.replace("_", "a").isalnum() else "the name of an environment variable, like VLLM_API_KEY"


def _remote(doc: str) -> dict:
    """The fields that point a model at an OpenAI-compatible server (vLLM), for [model] and [guard]."""
    return {
        "backend": _f("local", f"where the {doc} runs: local (this machine) or openai (an OpenAI-compatible server: "
                      "vLLM; prompts then go to that server)", _one_of("local", "openai")),
        "base_url": _f("", "the server's address with openai, like http://127.0.0.1:8000/v1", _url),
        "api_key_env": _f("", "the environment variable that holds the server's API key (the key itself is never "
                          "written anywhere); empty: no key", _env_name),
        "served_model": _f("", "the model's name on the server; empty: the only one it serves"),
    }


def _nonempty(v):
    return None if v.strip() else "a repo id, a folder or a file (not empty)"


@dataclass
class ModelSettings:
    source: str = _f(DEFAULT_MODEL, "HF repo id (from the local cache), a model folder, a .gguf file or Meta's original folder "
                     "(with backend = openai: where its tokenizer is, to build prompts with)",
                     _nonempty)
    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps", _device)
    dtype: str = _f("auto", "auto, bfloat16, float16 or float32", _one_of("auto", "bfloat16", "float16", "float32"))
    context: int = _f(0, "context window in tokens; 0 means 8192 on CPU, 32768 on GPU", _at_least(0))
    quantize: str = _f("auto", "CPU weight mode: auto (int4 on a CPU where it runs fast, else bf16), bf16 (none), "
                       "int8, int4 (group 32; output layer int4, its best logits from int8) or int4-fast", _one_of(*QUANTIZE_MODES))
    compile: str = _f("auto", "compiled decoding, warmed in the background: auto (in the app, on CPU), on or off",
                      _one_of("auto", "on", "off"))
    _remote_fields = _remote("chat model")
    backend: str = _remote_fields["backend"]
    base_url: str = _remote_fields["base_url"]
    api_key_env: str = _remote_fields["api_key_env"]
    served_model: str = _remote_fields["served_model"]
    del _remote_fields


@dataclass
class GenerationSettings:
    temperature: typing.Optional[float] = _f(None, "sampling temperature; 0 is greedy; unset uses the checkpoint's", _between(0, 2))
    top_p: typing.Optional[float] = _f(None, "nucleus sampling mass; unset uses the checkpoint's", _between(0, 1, lo_open=True))
    max_new_tokens: int = _f(1024, "longest reply in tokens", _at_least(1))
    seed: typing.Optional[int] = _f(None, "sampling seed for reproducible replies", _between(0, 2**64 - 1))
    repetition_penalty: typing.Optional[float] = _f(None, "penalty on tokens among the latest 256 (llama.cpp's "
                                                    "repeat_penalty); 1 is off; unset uses the checkpoint's",
                                                    _between(0, 2, lo_open=True))


@dataclass
class GuardSettingsConfig:
    enabled: bool = _f(True, "screen every message and reply with Llama Guard")
    source: str = _f(DEFAULT_GUARD, "the Llama Guard 3 checkpoint: repo id, folder or .gguf (with backend = openai: "
                     "where its tokenizer is)", _nonempty)
    excluded: list = _f([], "categories not screened, e.g. [\"S6\", \"S7\"]", _codes)
    threshold: float = _f(0.5, "P(unsafe) at which a message is blocked", _between(0, 1, lo_open=True, hi_open=True))
    mode: str = _f("strict", "strict: show only checked text; fast: show at once and retract if unsafe", _one_of("strict", "fast"))
    check_every: int = _f(64, "tokens between checks of a streaming reply (sooner at a sentence end, after half as many)", _at_least(1))
    token_budget: int = _f(2048, "conversation tokens the guard reads per check", _at_least(64))
    precision: str = _f("auto", "auto (int8 on a CPU where the native kernel runs and the int8 guard passes its probe "
                        "check, else unquantized), bf16 (unquantized) or int8", _one_of("auto", "bf16", "int8"))
    _remote_fields = _remote("guard")
    backend: str = _remote_fields["backend"]
    base_url: str = _remote_fields["base_url"]
    api_key_env: str = _remote_fields["api_key_env"]
    served_model: str = _remote_fields["served_model"]
    del _remote_fields


@dataclass
class PromptSettings:
    default: str = _f("assistant", "the preset new conversations start with")
    presets: dict = _f({}, "your own system prompts: name = \"text\"")


@dataclass
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    guard: GuardSettingsConfig = field(default_factory=GuardSettingsConfig)
    prompts: PromptSettings = field(default_factory=PromptSettings)

    def all_presets(self) -> dict[str, str]:
        """Shipped presets, then those saved from the app, then config.toml's."""
        import tomllib

        from app.presets import load_saved_presets
        from assets import read_text

        return {**tomllib.loads(read_text("presets.toml"))["presets"], **load_saved_presets(), **self.prompts.presets}

    def preset(self, name: str) -> str:
        presets = self.all_presets()
        if name not in presets:
            raise ConfigError(f"No system prompt preset named {name!r}. Presets: {', '.join(sorted(presets))}.")
        return presets[name]


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_types(section: str) -> dict:
    cls = {"model": ModelSettings, "generation": GenerationSettings, "guard": GuardSettingsConfig,
           "prompts": PromptSettings}[section]
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _expected(tp) -> str:
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false", list: "a list of strings",
             dict: "a table of name = \"text\""}
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return names.get(args[0] if args else tp, str(tp))


def _coerce(value, tp, *, from_text: bool):
    """Convert a TOML value (or an environment string) to `tp`; raise ValueError when it does not fit."""
    optional = type(None) in typing.get_args(tp)
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
    if from_text:
        text = value.strip()
        if optional and text.lower() in ("", "none", "default"):
            return None
        if base is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is list:
            return [p.strip() for p in text.split(",") if p.strip()]
        if base is dict:
            raise ValueError
        return base(text)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is list:  # of strings
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ValueError
    if base is dict:  # of strings
        if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            return value
        raise ValueError
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise ValueError


def apply_setting(config: Config, section: str, key: str, value, *, where: str, from_text: bool = False) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section [{section}]; known sections: {', '.join(SECTIONS)}.")
    types = _section_types(section)
    if key not in types:
        raise ConfigError(f"{where}: unknown key {key!r} in [{section}]; known keys: {', '.join(types)}.")
    tp, f = types[key]
    try:
        value = _coerce(value, tp, from_text=from_text)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: {section}.{key} must be {_expected(tp)}, not {value!r}.") from None
    problem = f.metadata["check"](value) if f.metadata.get("check") else None
    if problem:
        raise ConfigError(f"{where}: {section}.{key} must be {problem}; got {value!r}.")
    if key == "excluded":
        value = [c.upper() for c in value]
    setattr(getattr(config, section), key, value)


def load_config(path: Path | None = None, *, env: typing.Mapping[str, str] | None = None,
                overrides: typing.Mapping[str, typing.Any] | None = None) -> Config:
    """Defaults, then the TOML file, then LLAMA_CHAT_<SECTION>_<KEY> variables, then `overrides`
    ({"guard.enabled": False, ...}, from the command line)."""
    import tomllib

    path = path or config_file()
    config = Config()
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path} is not a file. The configuration must be a TOML file there; move that away.")
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}. Fix the file or move it away.") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: {section!r} must be a [section] table; known sections: {', '.join(SECTIONS)}.")
            for key, value in table.items():
                apply_setting(config, section, key, value, where=str(path))
    env = os.environ if env is None else env
    for name, value in env.items():
        # LLAMA_CHAT_<SECTION>_<KEY>; other LLAMA_CHAT_ names (HOME, DEBUG, KERNEL) belong to others
        section, _, key = name[len("LLAMA_CHAT_"):].lower().partition("_")
        if name.startswith("LLAMA_CHAT_") and section in SECTIONS:
            apply_setting(config, section, key, value, where=f"environment variable {name}", from_text=True)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, _, key = dotted.partition(".")
            apply_setting(config, section, key, value, where="command line")
    for section in (config.model, config.guard):
        name = "model" if section is config.model else "guard"
        if section.backend == "openai" and not section.base_url:
            raise ConfigError(f"{name}.backend is openai but {name}.base_url is empty: give the server's address "
                              f"(--{'guard-' if name == 'guard' else ''}base-url http://HOST:PORT/v1 or {name}.base_url "
                              "in config.toml).")
    if config.prompts.default and config.prompts.default not in config.all_presets():
        raise ConfigError(f"{path}: prompts.default names no preset: {config.prompts.default!r}. Presets: "
                          f"{', '.join(sorted(config.all_presets()))}.")
    return config


def to_toml(config: Config) -> str:
    """The effective configuration as TOML, each key with its docstring."""
    import json

    out = []
    for section in SECTIONS:
        values = getattr(config, section)
        out.append(f"[{section}]")
        nested = []
        for key, (_tp, f) in _section_types(section).items():
            value = getattr(values, key)
            if isinstance(value, dict):
                nested.append((key, value))
                continue
            line = f"# {key} = (unset)" if value is None else f"{key} = {json.dumps(value, ensure_ascii=False)}"
            out.append(f"{line:<52} # {f.metadata['doc']}")
        for key, table in nested:
            out.append(f"\n[{section}.{key}]")
            out += [f"{json.dumps(k)} = {json.dumps(v, ensure_ascii=False)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)
