from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from tinylmm.api import export_checkpoint


class Target(str, Enum):
    hf_llava = "hf-llava"
    tinyllava = "tinyllava"


def export(
    model_dir: Path = typer.Argument(..., help="a tinylmm checkpoint, e.g. runs/x/final (adapters are merged first)"),
    out: Path = typer.Argument(..., help="where to write the exported model (must not exist)"),
    to: Target = typer.Option(
        ...,
        "--to",
        help="hf-llava: transformers' LLaVA (AutoModelForImageTextToText, vLLM's layout); "
        "tinyllava: TinyLLaVA_Factory's own layout",
    ),
):
    """Write a checkpoint in another framework's layout; what the format cannot hold is refused."""
    from rich.console import Console

    path, notes = export_checkpoint(model_dir, out, to=to.value)
    console = Console()
    for note in notes:
        style = "yellow" if note.startswith("warning") else None
        console.print(f"  {note}", style=style, highlight=False)
    console.print(f"exported model: [bold]{path}[/bold]")
