"""The package's internal import graph, read from the source (AST, every import statement,
function-level ones included), and the layer rules it must keep.

    python tests/import_graph.py        # the figures: modules, imports, deferred share, cycles, largest file

tests/test_layers.py holds the graph to the rules: imports go downward only (a module imports
its own layer or below), no cycle, and deferred internal imports only where start-up time
asks for them (the CLI and the package root).
"""

from __future__ import annotations

import ast
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tinylmm"

# Bottom to top. A module belongs to the first entry its dotted name (without "tinylmm.") starts with.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "resources", "files"),
    ("registry", "sizes"),
    ("schema",),
    ("trainability", "catalog"),
    ("data",),
    ("models",),
    ("memory", "eval", "convert"),
    ("config",),
    ("train", "serve"),
    ("api",),
    ("cli", ""),  # "" is the package root, tinylmm/__init__.py
]
# Internal imports inside functions are kept only for start-up time: an api function imports
# the subsystem its command needs when called (`tinylmm --help`, `ls` and `zoo ls` import no
# ML library), and `import tinylmm` stays light.
DEFERRED_ALLOWED = ("api", "")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported module, dotted
    line: int
    deferred: bool  # inside a function


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The internal module a dotted name refers to (a module, or the package holding an attribute)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


@functools.cache
def _edges() -> tuple[Edge, ...]:
    known = modules()
    out = []
    for mod, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, deferred in _imports(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from this module's package
                    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                names = [f"{base}.{a.name}" for a in node.names] if base.startswith("tinylmm") else []
                names = names or [base]
            for name in names:
                if not name.startswith("tinylmm"):
                    continue
                target = _resolve(name, known)
                if target is not None and target != mod:
                    out.append(Edge(mod, target, node.lineno, deferred))
    return tuple(dict.fromkeys(out))  # `from x import a, b` is one import of x


def edges() -> list[Edge]:
    """Every internal import: (importing module, imported module, line, inside a function?)."""
    return list(_edges())


def _imports(tree: ast.AST):
    """(import node, inside a function?) for every import statement."""

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # annotations only: never imported at run time
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    yield from walk(tree, False)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def layer_of(module: str) -> tuple[int, str]:
    """(rank, layer entry) of a dotted module name."""
    rest = module.removeprefix("tinylmm").removeprefix(".")
    for rank, entries in enumerate(LAYERS):
        for entry in entries:
            if entry and (rest == entry or rest.startswith(entry + ".")):
                return rank, entry
    if rest == "":
        return len(LAYERS) - 1, ""
    raise KeyError(f"module {module} belongs to no layer of tests/import_graph.py LAYERS")


def cycles(graph_edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in graph_edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def violations(graph_edges: list[Edge]) -> list[str]:
    """Every edge that breaks a layer rule, worded with the file and line at fault."""
    out = []
    for e in graph_edges:
        (rs, ls), (rt, lt) = layer_of(e.source), layer_of(e.target)
        where = f"{modules()[e.source].relative_to(ROOT)}:{e.line}: {e.source} -> {e.target}"
        if rt > rs:
            out.append(f"{where} imports upward (layer '{ls}' may not import layer '{lt}')")
        elif rt == rs and ls != lt:
            out.append(f"{where} imports a sibling layer ('{ls}' and '{lt}' are siblings)")
        if e.deferred and ls not in DEFERRED_ALLOWED:
            out.append(f"{where} is a function-level import (move it to the top of the module)")
    return out


def figures() -> dict:
    graph_edges = edges()
    sizes = {m: len(p.read_text().splitlines()) for m, p in modules().items()}
    largest = max(sizes, key=sizes.get)
    comps = cycles(graph_edges)
    return {
        "modules": len(sizes),
        "internal imports": len(graph_edges),
        "deferred": sum(e.deferred for e in graph_edges),
        "deferred share": f"{sum(e.deferred for e in graph_edges) / max(1, len(graph_edges)):.1%}",
        "largest cycle": max((len(c) for c in comps), default=0),
        "largest file": f"{modules()[largest].relative_to(ROOT)} ({sizes[largest]} lines)",
    }


if __name__ == "__main__":
    for key, value in figures().items():
        print(f"{key}: {value}")
