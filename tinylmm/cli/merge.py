from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tinylmm.api import merge_checkpoint


def merge(
    model_dir: Path = typer.Argument(..., help="a checkpoint with LoRA/QLoRA adapters, e.g. runs/x/final"),
    out: Optional[Path] = typer.Argument(
        None,
        help="where to write the merged checkpoint (default: <checkpoint>-merged beside the checkpoint "
        "MODEL_DIR is or links to)",
    ),
    full_precision_base: bool = typer.Option(
        False,
        "--full-precision-base",
        help="after QLoRA, add the adapters to the original base instead of the dequantized 4-bit one they "
        "were trained on",
    ),
):
    """Fold the adapters into the weights: a self-contained, full-precision checkpoint."""
    from rich.console import Console

    path = merge_checkpoint(model_dir, out, full_precision_base=full_precision_base)
    Console().print(f'merged model: [bold]{path}[/bold]   try: tinylmm chat {path} --image IMG "question"')
