"""The package's import graph: layers import one way, nobody reaches into another's privates.

The graph is read from the source (``ast``), not by importing, so it sees imports inside
functions too. A *unit* is a top-level subpackage (``jaxsave._stream``, ...) or a top-level
module (``jaxsave.hdf5``, ...); see docs/architecture.md for the layers.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxsave"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_module(name: str) -> bool:
    return name in MODULES


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _unit(module: str) -> str:
    """``jaxsave._stream.state`` -> ``jaxsave._stream``; ``jaxsave.hdf5`` -> itself."""
    return ".".join(module.split(".")[:2])


def _imports(module: str) -> list[tuple[int, str, str | None]]:
    """``(line, target module, imported name or None)`` for each jaxsave import."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "jaxsave":
                    found.append((node.lineno, alias.name, None))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.split(".")[0] != "jaxsave":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if _is_module(full):
                    found.append((node.lineno, full, None))
                else:
                    found.append((node.lineno, base, alias.name))
    return found


def _module_aliases(module: str) -> dict[str, str]:
    """Local names bound to jaxsave modules (``from jaxsave._core import dtypes as _dtypes``)."""
    tree = ast.parse(MODULES[module].read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxsave"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if _is_module(full):
                    aliases[alias.asname or alias.name] = full
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("jaxsave") and alias.asname:
                    aliases[alias.asname] = alias.name
    return aliases


def _reach_ins(module: str) -> list[str]:
    bad = []
    for line, target, name in _imports(module):
        if name is not None and _is_private(name) and target != module:
            bad.append(f"{MODULES[module]}:{line}: imports {name} from {target}")
    aliases = _module_aliases(module)
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _is_private(node.attr)
        ):
            bad.append(f"{MODULES[module]}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}")
    return bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _graph(key) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        if module in ("jaxsave", "jaxsave.__main__"):
            continue  # the facade and the CLI sit above everything
        for _, target, _ in _imports(module):
            if target in ("jaxsave", "jaxsave.__main__") or key(target) == key(module):
                continue
            graph.setdefault(key(module), set()).add(key(target))
    return graph


def test_the_graph_is_read():
    assert len(MODULES) > 30
    assert "jaxsave.errors" in {t for _, t, _ in _imports("jaxsave.hdf5")}


def test_no_private_name_crosses_a_module_boundary():
    bad = [line for module in MODULES for line in _reach_ins(module)]
    assert not bad, "reach-ins into private names:\n" + "\n".join(bad)


@pytest.mark.parametrize("level", ["unit", "module"])
def test_no_import_cycle(level):
    graph = _graph(_unit if level == "unit" else (lambda m: m))
    assert not _cycles(graph), f"import cycles between {level}s: {_cycles(graph)}"


def test_the_core_layer_imports_nothing_above_it():
    for module in MODULES:
        if _unit(module) == "jaxsave._core":
            for line, target, _ in _imports(module):
                assert _unit(target) in ("jaxsave._core", "jaxsave.errors"), (
                    f"{MODULES[module]}:{line} imports {target}"
                )


def test_the_map_names_every_module():
    """docs/architecture.md's tree names every module of the package (``formats/{base,...}.py`` too)."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    tree = doc.split("```text", 1)[1].split("```", 1)[0]
    named = set(re.findall(r"\w+", tree))
    missing = [str(p.relative_to(PACKAGE)) for p in MODULES.values() if p.stem not in named]
    assert not missing, f"modules the map in docs/architecture.md does not name: {missing}"


def test_the_checks_catch_what_they_are_for():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert not _cycles({"a": {"b"}, "b": {"c"}})
    assert _is_private("_open") and not _is_private("__version__") and not _is_private("open")
