"""The layout's rules, read from the source (docs/architecture.md): ``interp`` imports no plug-in,
its modules import each other without a circle (type-only and function-level imports counted),
and no module or function outgrows what a reader can hold."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 60


def _modules(package: str) -> dict[str, Path]:
    """Module name -> file, a package's ``__init__`` standing for the package."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported(path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every module an import statement of ``path`` names, wherever the statement is (module level,
    ``if TYPE_CHECKING``, inside a function); ``from pkg import sub`` names the submodule."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                yield sub if sub in known else node.module


def import_graph(package: str) -> dict[str, set[str]]:
    """Edges between the modules of ``package`` (an import of a name resolves to its module)."""
    mods = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target in imported(path, mods):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_circle_finder_finds_a_circle() -> None:
    """A hand-made graph: the finder is not vacuous."""
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_interp() -> None:
    assert find_circle(import_graph("interp")) is None


def test_interp_imports_no_plugin() -> None:
    mods = _modules("interp")
    bad = [(name, target) for name, path in mods.items() for target in imported(path, mods)
           if target.split(".")[0] in ("circuits", "app")]
    assert bad == []


@pytest.mark.parametrize("package", ["interp", "circuits", "app"])
def test_modules_and_functions_stay_small(package: str) -> None:
    long_files, long_functions = [], []
    for path in sorted((ROOT / package).rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long_files == []
    assert long_functions == []
