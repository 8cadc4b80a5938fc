"""The package's shape: no import cycle (function-level imports included), the
training modules apart from the embedding package, modules and functions of a
size a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Folders and the package names they map to (setup.cfg's package_dir).
PACKAGES = {
    "catchment_mae": "catchment_mae",
    "batch": "catchment_mae.batch",
    "export": "catchment_mae.export",
}
# The modules that train (they must not need the embedding package).
TRAINING = (
    "trainer", "train_data", "epochs", "prepare", "pass_thread", "cache",
    "shard_rows", "loaders", "data", "model", "defaults", "config", "spec",
    "checkpoint", "distributed", "warmup", "plots",
)  # fmt: skip
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``path`` imports, anywhere in it: ``from P import
    M`` names module P.M where there is one, else P."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            found.update(s for s in subs if s in modules)
            if any(s not in modules for s in subs) and node.module in modules:
                found.add(node.module)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph``, or None (depth-first, iterative)."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    for start in graph:
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_cycle__finds_one_and_only_one_that_is_there():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_structure__no_import_cycle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    assert _cycle(graph) is None


def test_structure__training_imports_nothing_of_the_embedding_package():
    modules = _modules()
    for name in TRAINING:
        imported = _imports(modules[f"catchment_mae.{name}"], modules)
        assert not {m for m in imported if m.startswith("catchment_mae.batch")}, name


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_structure__modules_and_functions_a_reader_can_hold(folder):
    for path in (ROOT / folder).rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= MAX_MODULE_LINES, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                assert lines <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name}"
