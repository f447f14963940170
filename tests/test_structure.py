"""The package's shape: the import graph of `mlx_gemma4` has no cycles (generation layers engine -> generate ->
session -> cli, one direction), and every console script in pyproject.toml names a callable."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mlx_gemma4"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_main_guard(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":` — its body runs as the module `__main__`, not as this module."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(getattr(c, "value", None) == "__main__" for c in test.comparators))


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of the package that `path` imports anywhere (module level or inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    guarded = {id(n) for top in tree.body if _is_main_guard(top) for n in ast.walk(top)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycles():
    graph = import_graph()
    assert {"mlx_gemma4.engine", "mlx_gemma4.generate", "mlx_gemma4.session", "mlx_gemma4.cli"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_generation_layers_import_downwards_only():
    graph = import_graph()
    layers = ["mlx_gemma4.engine", "mlx_gemma4.generate", "mlx_gemma4.session", "mlx_gemma4.cli"]
    for i, low in enumerate(layers):
        assert not graph[low] & set(layers[i + 1:]), f"{low} imports a layer above it"
    assert "mlx_gemma4.processing.processor" not in graph["mlx_gemma4.engine"]  # the engine is ids in, ids out
    assert not graph["mlx_gemma4.prompt_cache"] & set(layers)


def test_kernels_is_a_leaf_and_nothing_edits_sys_path():
    """mlx_gemma4/kernels imports nothing from the package but its own modules (the emulator is the tests'
    business), and no module of the package edits sys.path to reach tools/."""
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith("mlx_gemma4.kernels"):
            assert all(d.startswith("mlx_gemma4.kernels") for d in deps), f"{module} imports {sorted(deps)}"
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text and "import msim" not in text and "from msim" not in text, path


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_console_scripts_name_callables():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"mlx-gemma4", "mlx-gemma4-convert", "mlx-gemma4-prompt-cache"} <= set(scripts)
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target
