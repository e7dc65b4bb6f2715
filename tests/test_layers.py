"""The house in layers (docs/ARCHITECTURE.md): imports go downward only, nothing imports in
a cycle, and the config schema and its resolution import no model, data or training code."""

import subprocess
import sys

import import_graph as g


def test_imports_go_downward_only_and_deferred_imports_are_kept_for_start_up_time():
    assert g.violations(g.edges()) == []


def test_no_import_cycle():
    assert g.cycles(g.edges()) == []


def test_every_module_belongs_to_a_layer():
    for module in g.modules():
        g.layer_of(module)  # KeyError names the module


def closure(start: str) -> set[str]:
    """Every internal module `start` imports, directly or through others (at any depth)."""
    by_source: dict[str, set[str]] = {}
    for e in g.edges():
        by_source.setdefault(e.source, set()).add(e.target)
    seen, todo = set(), [start]
    while todo:
        for target in by_source.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_schema_and_resolution_import_no_model_data_or_training_module():
    for module in ("tinylmm.schema", "tinylmm.config.resolve", "tinylmm.config.layers", "tinylmm.catalog.zoo"):
        reached = closure(module)
        heavy = sorted(m for m in reached if m.split(".")[1] in ("models", "data", "train", "memory", "eval"))
        assert heavy == [], (module, heavy)


def test_the_rules_catch_an_upward_import_and_a_cycle():
    edges = [
        g.Edge("tinylmm.schema", "tinylmm.models.lmm", 1, False),
        g.Edge("tinylmm.models.lmm", "tinylmm.schema", 1, False),
        g.Edge("tinylmm.memory.plan", "tinylmm.eval.shapes", 1, False),
        g.Edge("tinylmm.models.lmm", "tinylmm.errors", 9, True),
    ]
    found = g.violations(edges)
    assert any("tinylmm.schema -> tinylmm.models.lmm imports upward" in v for v in found)
    assert any("imports a sibling layer" in v for v in found)
    assert any("function-level import" in v for v in found)
    assert g.cycles(edges) == [["tinylmm.models.lmm", "tinylmm.schema"]]


def test_listing_the_zoo_imports_no_ml_library():
    code = (
        "import sys; from tinylmm.api import zoo_select; rows = zoo_select(); assert rows[1]['params']; "
        "assert not {'torch', 'transformers'} & set(sys.modules), sorted({'torch', 'transformers'} & set(sys.modules))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
