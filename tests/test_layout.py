"""The package's shape: the import graph of ``src/graphdistill`` has no circle, type-only imports aside (an
import under ``if TYPE_CHECKING:`` never runs). Function-level imports count: they run when called."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "graphdistill"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            arg = node.args[
                0
            ]  # importlib.import_module("pkg.mod") or (f"pkg.{name}"): every module it can be
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value)
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                prefix = str(arg.values[0].value)
                found.update(m for m in modules if m.startswith(prefix))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # "from pkg import submodule" imports the submodule
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {m: _imports(ast.parse(p.read_text()), modules) - {m} for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_cycle_finder_finds_a_planted_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_type_only_imports_do_not_count_and_function_level_ones_do() -> None:
    code = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from graphdistill.b import X\n"
        "def f():\n    from graphdistill.c import Y\n"
        "def g(name):\n    importlib.import_module(f'graphdistill.cmd.{name}')\n"
    )
    modules = {"graphdistill.b", "graphdistill.c", "graphdistill.cmd.x", "graphdistill.cmd.y"}
    assert _imports(ast.parse(code), modules) == {
        "graphdistill.c",
        "graphdistill.cmd.x",
        "graphdistill.cmd.y",
    }


def test_the_import_graph_has_no_circle() -> None:
    graph = import_graph()
    assert "graphdistill.filter.filtering" in graph and "graphdistill.export.bundle" in graph
    assert cycles(graph) == []


def test_a_trace_flows_through_packages_named_after_its_stages() -> None:
    for stage in ("recording", "store", "filter", "student", "export", "eval", "runner", "commands"):
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
    assert not (PACKAGE / "datasets").exists()
