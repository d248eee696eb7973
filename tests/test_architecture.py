"""The package's layering, read from the source: no import cycles, evaluation never imports training."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "safesteer"
MAX_LINES = 400  # one concept per module: about what a reader holds in mind at once

# Modules still over MAX_LINES, each with the reason it is not split yet. The test below fails on
# any other long module, and on one of these once it fits, so that the list only shrinks.
KNOWN_LONG: dict[str, str] = {}

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in (SOURCE / PACKAGE).rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(tree: ast.Module, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``tree`` imports when it runs, at any depth (function-level
    imports included); ``if TYPE_CHECKING:`` blocks are skipped, they never run."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:
                found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name.startswith(PACKAGE)}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(ast.parse(path.read_text(encoding="utf-8")), modules) - {name}
            for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[frozenset[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "safesteer.distill.trainer" in graph["safesteer.pipeline"]  # from a import b
    assert "safesteer.compare_config" in graph["safesteer.cli"]  # a function-level import
    assert "safesteer.direction.artifact" not in graph["safesteer.tokens.selection"]  # TYPE_CHECKING only
    assert "safesteer.cli" not in graph["safesteer.commands"]  # likewise
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_evaluation_never_imports_training_code() -> None:
    offending = {name: sorted(target for target in targets if target.startswith("safesteer.distill"))
                 for name, targets in import_graph().items() if name.startswith("safesteer.evaluate")}
    assert {name: targets for name, targets in offending.items() if targets} == {}


def test_no_import_cycle() -> None:
    assert import_cycles(import_graph()) == []


def test_no_module_over_the_line_limit_beyond_the_known_ones() -> None:
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    assert {name for name, lines in lengths.items() if lines > MAX_LINES} == set(KNOWN_LONG)
