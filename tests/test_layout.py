"""The three layers stay apart: the core never imports the application or the command line, the
application never imports the command line, and no two modules import each other (a cycle), with
imports inside functions counted too."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import deltaft

PACKAGE_ROOT = Path(deltaft.__file__).parent
APP, CLI = "deltaft.app", "deltaft.cli"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> Iterator[str]:
    """The deltaft modules that ``module`` imports anywhere in its source (function bodies too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            # `from pkg import sub` imports the submodule when there is one
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for name in names:
            if name == "deltaft" or name.startswith("deltaft."):
                yield name


def _graph() -> dict[str, set[str]]:
    modules = _all_modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {dep for dep in _imported(tree, name, is_package, known) if dep != name}
    return graph


def _layer(module: str) -> str:
    if module == "deltaft.__main__":  # `python -m deltaft` is the command line
        return CLI
    for prefix in (CLI, APP):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return "core"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_every_module_and_function_level_imports() -> None:
    graph = _graph()
    assert {"deltaft", "deltaft.objective", APP, CLI} <= set(graph)
    # `cli.main` imports the subcommands inside functions today or tomorrow: either way it is seen
    assert any(_layer(dep) == APP for dep in graph[CLI] | set().union(*graph.values()))


def test_core_imports_neither_the_application_nor_the_command_line() -> None:
    wrong = [
        f"{module} imports {dep}"
        for module, deps in sorted(_graph().items())
        if _layer(module) == "core"
        for dep in sorted(deps)
        if _layer(dep) != "core"
    ]
    assert not wrong, "the core must not depend on deltaft.app / deltaft.cli:\n" + "\n".join(wrong)


def test_the_application_never_imports_the_command_line() -> None:
    wrong = [
        f"{module} imports {dep}"
        for module, deps in sorted(_graph().items())
        if _layer(module) == APP
        for dep in sorted(deps)
        if _layer(dep) == CLI
    ]
    assert not wrong, "deltaft.app must not depend on deltaft.cli:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_the_cycle_finder_finds_cycles(
    graph: dict[str, set[str]], expected: list[list[str]]
) -> None:
    assert _cycles(graph) == expected


def test_function_level_and_relative_imports_are_edges() -> None:
    source = "def f():\n    from deltaft.app import config\n    from . import hooks\n"
    known = {"deltaft.app.config", "deltaft.hooks"}
    found = set(_imported(ast.parse(source), "deltaft.layers", False, known))
    assert found == {"deltaft.app.config", "deltaft.hooks"}
