"""Architecture rules: which way imports go, no import cycles, what the entry points load, where Textual is."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGES = ("app", "model", "guard", "assets")


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return set(out.split())


def import_graph() -> dict[str, set[str]]:
    """Every project module and the project modules it imports, at the top or inside functions alike."""
    files = {}
    for path in ROOT.glob("*/**/*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.parts[0] in PACKAGES:
            files[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert {"model.runner", "guard.classifier", "app.tui.app"} <= set(graph)
    assert cycles(graph) == []


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_tui_talks_only_to_the_session():
    """app/tui imports nothing of model/, guard/, app.history or app.cli: the session answers for them."""
    forbidden = ("model", "guard", "app.history", "app.cli")
    offenders = {name: sorted(d for d in deps if d.startswith(forbidden))
                 for name, deps in import_graph().items() if name.startswith("app.tui")}
    assert {name: deps for name, deps in offenders.items() if deps} == {}


def test_model_and_guard_never_import_the_app():
    graph = import_graph()
    assert {n: sorted(d for d in deps if d.startswith("app")) for n, deps in graph.items()
            if n.startswith(("model", "guard")) and any(d.startswith("app") for d in deps)} == {}
    assert not any(d.startswith("guard") for n, deps in graph.items() if n.startswith("model") for d in deps)


def test_cli_and_core_modules_do_not_import_torch_or_transformers():
    # (model.qcache: the weights read starts before torch loads; the remote seams need neither)
    for module in ("app.cli", "app.tui.app", "app.session", "app.history", "app.config", "model", "guard.prompt",
                   "model.runner", "model.qcache", "model.remote", "guard.remote"):
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
