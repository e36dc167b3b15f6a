"""Config mistakes, one real `llama-chat config show` process each: exit 2, the file and the key named,
the file untouched, no exception names or tracebacks (issue 20, item 10)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from app.paths import config_file

BAD = [  # (config.toml, what the message must name)
    ('[guard]\nexcluded = [1, 2]\n', "guard.excluded"),
    ('[guard]\nexcluded = ["S99"]\n', "guard.excluded"),
    ('[guard]\nexcluded = "S6"\n', "guard.excluded"),
    ('[guard]\nexcluded = [["S1"]]\n', "guard.excluded"),
    ('[model]\ndevice = "banana"\n', "model.device"),
    ('[model]\ndevice = "cuda:x"\n', "model.device"),
    ('[model]\nsource = ""\n', "model.source"),
    ('[model]\nsource = 5\n', "model.source"),
    ('[guard]\nsource = "  "\n', "guard.source"),
    ('[prompts]\ndefault = "nope"\n', "prompts.default"),
    ('[prompts]\ndefault = 1\n', "prompts.default"),
    ('[prompts]\npresets = "pirate"\n', "prompts.presets"),
    ('[prompts.presets]\npirate = 1\n', "prompts.presets"),
    ('[generation]\nseed = 100000000000000000000000\n', "generation.seed"),
    ('[generation]\nseed = -1\n', "generation.seed"),
    ('[generation]\nseed = true\n', "generation.seed"),
    ('[generation]\ntemperature = "hot"\n', "generation.temperature"),
    ('[generation]\ntemperature = 3\n', "generation.temperature"),
    ('[generation]\ntop_p = 0\n', "generation.top_p"),
    ('[generation]\ntop_p = 1.5\n', "generation.top_p"),
    ('[generation]\ntop_p = nan\n', "generation.top_p"),
    ('[generation]\nmax_new_tokens = 0\n', "generation.max_new_tokens"),
    ('[generation]\nmax_new_tokens = "many"\n', "generation.max_new_tokens"),
    ('[generation]\nmax_new_tokens = 1.5\n', "generation.max_new_tokens"),
    ('[guard]\nthreshold = 0\n', "guard.threshold"),
    ('[guard]\nthreshold = 1\n', "guard.threshold"),
    ('[guard]\nthreshold = "high"\n', "guard.threshold"),
    ('[guard]\nmode = "paranoid"\n', "guard.mode"),
    ('[guard]\nenabled = "yes"\n', "guard.enabled"),
    ('[guard]\nenabled = 1\n', "guard.enabled"),
    ('[guard]\ncheck_every = 0\n', "guard.check_every"),
    ('[guard]\ncheck_every = 2.5\n', "guard.check_every"),
    ('[guard]\ntoken_budget = 10\n', "guard.token_budget"),
    ('[guard]\nprecision = "int4"\n', "guard.precision"),
    ('[model]\ndtype = "int3"\n', "model.dtype"),
    ('[model]\ncontext = -5\n', "model.context"),
    ('[model]\ncontext = true\n', "model.context"),
    ('[model]\nquantize = "int2"\n', "model.quantize"),
    ('[model]\ncompile = "maybe"\n', "model.compile"),
    ('[model]\nunknown_key = 1\n', "'unknown_key'"),
    ('[modle]\nsource = "x"\n', "[modle]"),
    ('model = "x"\n', "'model'"),
    ('this is = = not toml\n', "not valid TOML"),
]


def test_there_are_enough_variants():
    assert len(BAD) >= 40


@pytest.mark.slow
@pytest.mark.parametrize("text, key", BAD)
def test_a_bad_value_exits_2_naming_file_and_key(text, key):
    path = config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "app.cli", "config", "show"], capture_output=True, text=True,
                       timeout=60, env=os.environ.copy())
    assert r.returncode == 2, (text, r.stdout, r.stderr)
    assert str(path) in r.stderr and key in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not re.search(r"\b\w+(Error|Exception)\b", r.stderr), r.stderr
    assert "--no-guard" not in r.stderr  # never advice to turn the guard off for an unrelated mistake
    assert path.read_text(encoding="utf-8") == text


def test_a_folder_in_place_of_the_config_file_is_named():
    path = config_file()
    path.mkdir(parents=True)
    r = subprocess.run([sys.executable, "-m", "app.cli", "config", "show"], capture_output=True, text=True,
                       timeout=60, env=os.environ.copy())
    assert r.returncode == 2 and f"{path} is not a file" in r.stderr and path.is_dir()
