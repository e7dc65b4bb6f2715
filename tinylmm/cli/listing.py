"""`tinylmm ls` and `tinylmm cp`: the named things (presets, recipes, connectors, templates,
benchmarks, accelerate configs), and a shipped recipe or accelerate config copied for editing."""

from __future__ import annotations

from pathlib import Path

import typer

from tinylmm.api import copy_shipped, listing

KINDS = "presets | recipes | connectors | templates | benchmarks | accelerate | instruct"


def ls(kind: str = typer.Argument("presets", help=KINDS)):
    """List what is available by name."""
    from rich.console import Console
    from rich.table import Table

    rows = listing(kind)
    table = Table(title=kind)
    table.add_column("name", style="bold")
    table.add_column("description")
    for name, text in rows:
        table.add_row(name, text)
    Console().print(table)


def cp(
    name: str = typer.Argument(
        ..., help="a recipe, accelerate config or instruction templates (tinylmm ls recipes | accelerate | instruct)"
    ),
    dest: Path = typer.Argument(..., help="file or directory to copy it to"),
):
    """Copy a shipped recipe, accelerate config or instruction template file to edit it."""
    from rich.console import Console

    kind, path = copy_shipped(name, dest)
    runs = {
        "recipe": f"tinylmm train --recipe {path}",
        "accelerate config": f"tinylmm launch --config_file {path} train ...",
        "instruction templates": f"tinylmm data instructize FILE --task TASK --templates {path} --out OUT.json",
    }
    run = runs[kind]
    Console().print(f"copied {kind} '{name}' to {path}; run it with: {run}")
