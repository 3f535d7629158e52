"""The code's layout: imports run one way, between modules and between packages.

Every ``import`` in ``longnet/`` (top-level or inside a function) is an edge of a graph.
Module cycles are forbidden, and so are cycles between packages (``longnet.training`` ->
``longnet.bench`` -> ``longnet.training`` through two different modules counts too). The
layers below are the intended order; a package may import only packages of its own or a
lower layer.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, Set

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "longnet"

# Lowest first; every package and top-level module must be in one.
LAYERS = [
    {"longnet.fileio", "longnet.checks"},
    {"longnet.patterns", "longnet.argtypes"},
    {"longnet.backends"},
    {"longnet.functional", "longnet.varlen", "longnet.device", "longnet.report", "longnet.decode"},
    {"longnet.modules", "longnet.config"},
    {"longnet.model", "longnet.encoder", "longnet.compat", "longnet.analysis"},
    {"longnet.training", "longnet.hf", "longnet.bench"},
    {"longnet.distributed"},
    {"longnet.commands", "longnet.selftest", "longnet.plan"},
    {"longnet.cli", "longnet.__main__", "longnet"},
]


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path) -> Set[str]:
    """Absolute names of the longnet modules ``path`` imports."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("longnet"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("longnet"):
                continue
            out.add(mod)
            for a in node.names:  # "from . import report" names a module
                if (ROOT.parent / (mod.replace(".", "/") + f"/{a.name}.py")).exists() or \
                        (ROOT.parent / (mod.replace(".", "/") + f"/{a.name}/__init__.py")).exists():
                    out.add(f"{mod}.{a.name}")
    out.discard(name)
    return out


def _graph() -> Dict[str, Set[str]]:
    return {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def _unit(module: str) -> str:
    """The package (or top-level module) a module belongs to: longnet.training.data.corpus -> longnet.training."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _cycle(graph: Dict[str, Set[str]]):
    """One cycle of ``graph`` as a list of nodes, or None."""
    state: Dict[str, int] = {}
    stack = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if state.get(m) is None:
                found = visit(m)
                if found:
                    return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if state.get(n) is None:
            found = visit(n)
            if found:
                return found
    return None


def _layer(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"{unit} is in no layer of tests/test_layout.py: add it where it belongs")


def test_no_import_cycle_between_modules():
    assert _cycle(_graph()) is None


def test_no_import_cycle_between_packages():
    graph = _graph()
    # Imports inside one package are that package's business; a package's __init__ re-exporting
    # its own modules is not an edge to itself.
    units: Dict[str, Set[str]] = {}
    for mod, deps in graph.items():
        if mod == "longnet":
            continue  # the top-level __init__ re-exports the op and loads the rest lazily
        u = _unit(mod)
        units.setdefault(u, set()).update(_unit(d) for d in deps if _unit(d) != u and d != "longnet")
    assert _cycle(units) is None


def test_packages_import_only_their_own_or_lower_layers():
    bad = []
    for mod, deps in _graph().items():
        if mod == "longnet":
            continue
        for d in deps:
            if d != "longnet" and _layer(_unit(d)) > _layer(_unit(mod)):
                bad.append(f"{mod} -> {d}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_the_cycle_finder_finds_a_cycle():
    # The check above is only as good as its cycle finder.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "training").glob("*.py")))
def test_relative_imports_resolve(path):
    for dep in _imports(ROOT / "training" / path):
        rel = dep.replace(".", "/")
        assert (ROOT.parent / f"{rel}.py").exists() or (ROOT.parent / rel / "__init__.py").exists() or \
            (ROOT.parent / rel.rsplit("/", 1)[0]).with_suffix(".py").exists() or \
            (ROOT.parent / rel.rsplit("/", 1)[0] / "__init__.py").exists(), dep
