"""The package's layers, read from its source: no import cycle between its modules, the library (everything but
the command line: hybrid_engine/commands/ and the old path hybrid_engine/cli.py) never imports the command line (the
commands package or argparse), and no module below the
package face imports the face itself (`import hybrid_engine`, or a name `from hybrid_engine import` that is not a
submodule)."""

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hybrid_engine"
COMMAND_LINE = ("hybrid_engine.commands", "hybrid_engine.cli")
"""The command line's modules and packages; everything else of the package is the library."""


def is_command_line(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COMMAND_LINE)


@functools.cache
def modules() -> dict[str, ast.Module]:
    """Every module of the package by its dotted name (a package by its own name, not `.__init__`)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The names this module imports, anywhere in it: hybrid_engine modules resolved to the module (for
    `from package import submodule`, the submodule), anything else by its top-level name."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: {m for m in imports(tree, known) if m in known and m != name} for name, tree in trees.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


@pytest.mark.parametrize("name", sorted(n for n in modules() if not is_command_line(n)))
def test_the_library_never_imports_the_command_line(name):
    trees = modules()
    used = imports(trees[name], set(trees))
    assert "argparse" not in used
    assert not any(is_command_line(m) for m in used)


def test_nothing_below_the_package_face_imports_it():
    edges = graph()
    upward = sorted(name for name, deps in edges.items() if name != "hybrid_engine" and "hybrid_engine" in deps)
    assert upward == []


def names_compiled_ops(tree: ast.Module) -> bool:
    """Whether the module's code (not its docstrings) reaches torch.ops.hybrid_engine."""
    return any(isinstance(node, ast.Attribute) and node.attr == "hybrid_engine" and ast.unparse(node.value) ==
               "torch.ops" for node in ast.walk(tree))


def test_only_the_ops_library_module_reaches_the_compiled_ops():
    """Everything else calls ops._library.kernels(), which loads the ops first: a direct torch.ops.hybrid_engine
    call would fail in a process that has not loaded them yet."""
    assert names_compiled_ops(ast.parse("y = torch.ops.hybrid_engine.gae(1)"))
    reaching = sorted(name for name, tree in modules().items() if names_compiled_ops(tree))
    assert reaching == ["hybrid_engine.ops._library"]
