from __future__ import annotations

from pathlib import Path

import typer

from tinylmm.api import plot_run


def plot(run_dir: Path = typer.Argument(..., help="a run directory (holds metrics.jsonl), e.g. runs/x")):
    """Redraw a run's pictures from its metrics.jsonl: loss and lr over the stages, each evaluation."""
    from rich.console import Console

    console = Console()
    paths = plot_run(run_dir)
    for path in paths:
        console.print(f"plot: [bold]{path}[/bold]")
    if not paths:
        console.print(f"nothing to draw: {run_dir / 'metrics.jsonl'} holds no training step and no evaluation")
