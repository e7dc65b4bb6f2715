"""`tinylmm ls` and `tinylmm cp`: the named things (presets, recipes, connectors, templates,
benchmarks), and a shipped recipe copied for editing."""

from __future__ import annotations

from pathlib import Path

import typer

from tinylmm.api import copy_recipe, listing


def ls(kind: str = typer.Argument("presets", help="presets | recipes | connectors | templates | benchmarks")):
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
    recipe: str = typer.Argument(..., help="a shipped recipe name"),
    dest: Path = typer.Argument(..., help="file or directory to copy it to"),
):
    """Copy a shipped recipe to edit it, then run it with `tinylmm train --recipe FILE`."""
    from rich.console import Console

    path = copy_recipe(recipe, dest)
    Console().print(f"copied recipe '{recipe}' to {path}; run it with: tinylmm train --recipe {path}")
