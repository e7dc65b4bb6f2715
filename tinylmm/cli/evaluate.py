from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tinylmm.api import evaluate_checkpoint
from tinylmm.train.progress import Reporter


def evaluate(
    model_dir: Path = typer.Argument(..., help="a checkpoint directory, e.g. runs/x/final"),
    bench: str = typer.Option("shapes", "--bench", "-b", help="benchmark name"),
    out: Optional[Path] = typer.Option(None, "--out", help="results JSON (default <model_dir>/../eval/<bench>.json)"),
    data: Optional[Path] = typer.Option(
        None, "--data", help="benchmark data folder (shapes: made on the fly if absent)"
    ),
    batch_size: int = typer.Option(32, help="questions per generation batch"),
):
    """Evaluate a checkpoint on a benchmark and write the scores as JSON."""
    from rich.console import Console

    result, path = evaluate_checkpoint(model_dir, bench, out=out, data=data, batch_size=batch_size)
    Reporter(Console(), True, Path("/dev/null")).eval_table(result)
    Console().print(f"results: {path}")
