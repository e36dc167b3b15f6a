"""Architecture rules: the app's entry points import no torch/transformers; only app/tui imports Textual."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return set(out.split())


def test_cli_and_core_modules_do_not_import_torch_or_transformers():
    for module in ("app.cli", "app.tui.app", "app.session", "app.history", "app.config", "model", "guard.prompt",
                   "model.runner", "model.qcache"):  # the weights read starts before torch loads
        loaded = imported_after(module)
        assert "torch" not in loaded and "transformers" not in loaded, module


def test_only_app_tui_imports_textual():
    offenders = []
    for path in ROOT.glob("**/*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", ".ci-venv", "tests") or rel.parts[:2] == ("app", "tui"):
            continue
        text = path.read_text(encoding="utf-8")
        if "import textual" in text or "from textual" in text:
            offenders.append(str(rel))
    assert offenders == []
