from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from tinylmm.api import convert_checkpoint


class Source(str, Enum):
    tinyllava = "tinyllava"


def convert(
    src: Path = typer.Argument(..., help="the other framework's model directory"),
    out: Path = typer.Argument(..., help="where to write the tinylmm checkpoint (must not exist)"),
    source: Source = typer.Option(..., "--from", help="the framework that wrote SRC: tinyllava (TinyLLaVA_Factory)"),
    tokenizer: Optional[Path] = typer.Option(None, help="the tokenizer's directory, if SRC has none"),
    template: Optional[str] = typer.Option(None, help="conversation template (default: by the tokenizer's eos)"),
):
    """Import another framework's checkpoint as a tinylmm checkpoint that `tinylmm chat`,
    `eval` and `tinylmm.load` read."""
    from rich.console import Console

    path, notes = convert_checkpoint(src, out, source=source.value, tokenizer=tokenizer, template=template)
    console = Console()
    for note in notes:
        console.print(f"  {note}", highlight=False)
    console.print(f'converted model: [bold]{path}[/bold]   try: tinylmm chat {path} --image IMG "question"')
