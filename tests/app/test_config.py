"""Configuration: precedence, validation with clear errors, the user's file never written."""

from __future__ import annotations

import pytest

from app.config import Config, load_config, to_toml
from app.errors import ConfigError
from app.paths import config_file, database_file


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_and_locations_follow_llama_chat_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CHAT_HOME", str(tmp_path / "fresh"))  # not the shared test home (conftest)
    c = load_config(env={})
    assert c.model.source == "meta-llama/Llama-3.2-1B-Instruct" and c.guard.enabled and c.guard.mode == "strict"
    assert c.model.quantize == "auto"  # int4 on the CPU (model.device.pick_quantize)
    assert config_file() == tmp_path / "fresh" / "config" / "config.toml"
    assert database_file() == tmp_path / "fresh" / "data" / "history.sqlite3"
    assert not (tmp_path / "fresh").exists()  # nothing is created by reading settings


def test_precedence_cli_over_env_over_file(tmp_path):
    f = write(tmp_path / "c.toml", '[guard]\nthreshold = 0.3\nmode = "fast"\n[generation]\ntemperature = 0\n')
    c = load_config(f, env={})
    assert c.guard.threshold == 0.3 and c.guard.mode == "fast" and c.generation.temperature == 0.0
    c = load_config(f, env={"LLAMA_CHAT_GUARD_THRESHOLD": "0.7", "LLAMA_CHAT_GUARD_EXCLUDED": "s6, S7"})
    assert c.guard.threshold == 0.7 and c.guard.excluded == ["S6", "S7"] and c.guard.mode == "fast"
    c = load_config(f, env={"LLAMA_CHAT_GUARD_THRESHOLD": "0.7"}, overrides={"guard.threshold": 0.9, "guard.mode": None})
    assert c.guard.threshold == 0.9 and c.guard.mode == "fast"  # None means "not given on the command line"


@pytest.mark.parametrize("text, fragment", [
    ("[guard\nmode = 1", "not valid TOML"),
    ("[guard]\nmood = \"strict\"\n", "unknown key 'mood' in [guard]"),
    ("[gaurd]\nmode = \"strict\"\n", "unknown section [gaurd]"),
    ("[guard]\nthreshold = \"high\"\n", "guard.threshold must be a number"),
    ("[guard]\nthreshold = 1.5\n", "guard.threshold must be a number > 0 and < 1"),
    ("[guard]\nmode = \"lenient\"\n", "guard.mode must be one of 'strict', 'fast'"),
    ("[generation]\nmax_new_tokens = 0\n", "generation.max_new_tokens must be a whole number >= 1"),
    ("[generation]\nmax_new_tokens = true\n", "generation.max_new_tokens must be a whole number"),
    ("[guard]\nexcluded = [\"violence\"]\n", "guard.excluded must be category codes"),
    ("model = \"x\"\n", "'model' must be a [section] table"),
])
def test_bad_files_name_file_and_key_and_are_left_alone(tmp_path, text, fragment):
    f = write(tmp_path / "config.toml", text)
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    assert fragment in e.value.message and str(f) in e.value.message
    assert f.read_text() == text


def test_bad_environment_values_are_named():
    with pytest.raises(ConfigError, match="environment variable LLAMA_CHAT_GUARD_ENABLED: guard.enabled must be true or false"):
        load_config(env={"LLAMA_CHAT_GUARD_ENABLED": "maybe"})
    with pytest.raises(ConfigError, match="LLAMA_CHAT_GUARD_MODEE: unknown key 'modee' in \\[guard\\]"):
        load_config(env={"LLAMA_CHAT_GUARD_MODEE": "fast"})  # a typo in a setting's name is still caught


def test_other_llama_chat_variables_are_not_settings():
    env = {"LLAMA_CHAT_DEBUG": "1", "LLAMA_CHAT_KERNEL": "torch", "LLAMA_CHAT_HOME": "/tmp/x", "LLAMA_CHAT_GUARD_MODE": "fast"}
    assert load_config(env=env).guard.mode == "fast"


def test_presets_ship_and_user_presets_win(tmp_path):
    f = write(tmp_path / "c.toml", '[prompts]\ndefault = "pirate"\n[prompts.presets]\npirate = "Arr."\ncoder = "Mine."\n')
    c = load_config(f, env={})
    presets = c.all_presets()
    assert {"assistant", "concise", "teacher"} <= set(presets) and presets["coder"] == "Mine."
    assert c.preset(c.prompts.default) == "Arr."
    with pytest.raises(ConfigError, match="No system prompt preset named 'nope'"):
        c.preset("nope")


def test_show_round_trips_through_toml(tmp_path):
    import tomllib

    c = Config()
    c.guard.excluded = ["S6"]
    c.prompts.presets = {"x": "y \"quoted\""}
    text = to_toml(c)
    f = write(tmp_path / "c.toml", text)
    again = load_config(f, env={})
    assert again == c and tomllib.loads(text)["guard"]["excluded"] == ["S6"]


def test_compiled_decoding_is_for_lasting_chats_on_a_cpu_unless_set():
    from app.engine import wants_compile

    config = Config()
    config.model.device = "cpu"
    assert wants_compile(config, interactive=True) and not wants_compile(config, interactive=False)
    config.model.compile = "off"
    assert not wants_compile(config, interactive=True)
    config.model.compile = "on"
    assert wants_compile(config, interactive=False)
    write = config_file()
    write.parent.mkdir(parents=True, exist_ok=True)
    write.write_text('[model]\ncompile = "sometimes"\n')
    with pytest.raises(ConfigError, match="compile"):
        load_config()
