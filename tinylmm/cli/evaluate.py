"""`tinylmm eval`: `eval run MODEL` (also spelt `eval MODEL`) answers a benchmark with a
checkpoint and scores it; `eval score` scores an answer file in LLaVA's answer format, no model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from tinylmm import api
from tinylmm.train.progress import Reporter


class ModelOrCommand(TyperGroup):
    """`tinylmm eval MODEL ...` is `tinylmm eval run MODEL ...`: a first word that is neither a
    subcommand nor an option is the model directory (the command's form before `score` came)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=ModelOrCommand,
    no_args_is_help=True,
    help="Evaluate: `eval run MODEL` (or `eval MODEL`) on a benchmark; `eval score` an answer file, no model.",
)


@app.command("run")
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

    result, path = api.evaluate_checkpoint(model_dir, bench, out=out, data=data, batch_size=batch_size)
    Reporter(Console(), True, Path("/dev/null")).eval_table(result)
    Console().print(f"results: {path}")


@app.command("score")
def score(
    bench: str = typer.Option(..., "--bench", "-b", help="benchmark name (pope, scienceqa, gqa, ...)"),
    data: Path = typer.Option(
        ..., "--data", help="the benchmark's folder in LLaVA-1.5's layout (playground/data/eval/<bench>)"
    ),
    answers: Path = typer.Option(..., "--answers", help="answer file, JSON lines in LLaVA's answer format"),
    rule: Optional[str] = typer.Option(
        None, "--rule", help="answer rule: llava (default) or lmms-eval where the benchmark has it"
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="scores JSON (default <answers stem>.scores.json beside the answers)"
    ),
):
    """Score an answer file against a benchmark's official rule, without a model."""
    from rich.console import Console

    scores, path = api.score_answers(bench, data, answers, rule=rule, out=out)
    console = Console()
    console.print(scores_table(scores))
    if scores.get("missing", {}).get("n"):
        m = scores["missing"]
        console.print(f"[yellow]{m['n']} question(s) had no answer and were scored wrong: {', '.join(m['ids'][:10])}")
    console.print(f"scores: {path}")


def scores_table(scores: dict):
    """One row for the benchmark's metrics, then one per split/subtask/subject."""
    from rich.table import Table

    metrics = list(scores["metrics"])
    table = Table(title=f"{scores['bench']} ({scores['n']} questions, rule: {scores['rule']})")
    table.add_column("")
    table.add_column("n", justify="right")
    for m in metrics:
        table.add_column(m, justify="right")
    for group in ("splits", "subtasks", "subjects"):
        for name, row in scores.get(group, {}).items():
            table.add_row(name, str(row.get("n", "")), *(f"{row[m]:.1%}" if m in row else "" for m in metrics))
    table.add_row(
        "[bold]overall" if len(table.rows) == 0 else "[bold]mean",
        str(scores["n"]),
        *(f"[bold]{v:.1%}" for v in scores["metrics"].values()),
    )
    return table
