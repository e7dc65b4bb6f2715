from __future__ import annotations

from pathlib import Path

import typer

KINDS = ("presets", "recipes", "connectors", "templates")


def ls(kind: str = typer.Argument("presets", help="presets | recipes | connectors | templates")):
    """List what is available by name."""
    from rich.console import Console
    from rich.table import Table

    from tinylmm.config import unknown

    if kind not in KINDS:
        raise unknown("listing", kind, KINDS)
    table = Table(title=kind)
    table.add_column("name", style="bold")
    table.add_column("description")
    for name, text in _entries(kind):
        table.add_row(name, text)
    Console().print(table)


def _entries(kind: str):
    if kind == "presets":
        from tinylmm import zoo

        return [(p.name, p.description) for p in zoo.presets().values()]
    if kind == "recipes":
        from tinylmm.recipes import load_recipe, shipped

        return [(n, load_recipe(n).description) for n in shipped()]
    if kind == "connectors":
        from tinylmm.models.connectors import CONNECTORS

        return [(n, (c.__doc__ or "").strip().splitlines()[0]) for n, c in CONNECTORS.items()]
    from tinylmm.data.templates import describe_templates

    return describe_templates()


def cp(
    recipe: str = typer.Argument(..., help="a shipped recipe name"),
    dest: Path = typer.Argument(..., help="file or directory to copy it to"),
):
    """Copy a shipped recipe to edit it, then run it with `tinylmm train --recipe FILE`."""
    from rich.console import Console

    from tinylmm.recipes import copy_recipe

    path = copy_recipe(recipe, dest)
    Console().print(f"copied recipe '{recipe}' to {path}; run it with: tinylmm train --recipe {path}")
