"""What a run shows and records: rich progress bars, notes, metrics.jsonl, the eval tables, plots/."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tinylmm.train import plots


class Reporter:
    def __init__(self, console: Console | None, is_main: bool, metrics_path: Path):
        self.console = console or Console(stderr=True)
        self.is_main = is_main
        self.metrics_path = metrics_path
        self.progress: Progress | None = None
        self.task = None
        self.t_stage = 0.0
        self.tokens = 0
        self.positions = 0  # positions computed, padding included (useful: self.tokens)
        self.stage = ""

    def note(self, text: str) -> None:
        if self.is_main:
            self.console.print(f"[dim]•[/dim] {text}")

    def warn(self, text: str) -> None:
        if self.is_main:
            self.console.print(f"[bold yellow]warning:[/bold yellow] {text}")

    def truncate_metrics(self, stage: str, step: int) -> None:
        """On resume, drop the records past the checkpoint (they will be written again)."""
        if not self.is_main or not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("stage") != stage or rec.get("step", 0) <= step:
                keep.append(line)
        self.metrics_path.write_text("".join(k + "\n" for k in keep))

    def start_stage(self, name: str, total: int, start: int) -> None:
        self.t_stage, self.tokens, self.positions, self.stage = time.perf_counter(), 0, 0, name
        if not self.is_main:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(name, total=total, completed=start, loss=float("nan"), lr=0.0, tps=0.0)

    def step(self, stage, stage_index, step, loss, lr, grad_norm, tokens, seconds, positions=None) -> None:
        """`tokens`: the step's real tokens; `positions`: all it computed, padding included."""
        self.tokens += tokens
        self.positions += tokens if positions is None else positions
        if not self.is_main:
            return
        elapsed = time.perf_counter() - self.t_stage
        tps = self.tokens / max(elapsed, 1e-9)
        rec = {
            "stage": stage,
            "stage_index": stage_index,
            "step": step,
            "loss": round(loss, 6) if math.isfinite(loss) else None,  # strict JSON: a non-finite step is null
            "lr": lr,
            "grad_norm": round(grad_norm, 4) if math.isfinite(grad_norm) else None,
            "tokens": tokens,
            **({} if positions is None else {"positions": positions, "useful": round(tokens / max(positions, 1), 4)}),
            "tokens_per_s": round(tps, 1),
            "step_time": round(seconds, 4),
        }
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
        self.progress.update(self.task, completed=step, loss=loss, lr=lr, tps=tps)

    def end_stage(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            if self.positions:
                pad = self.positions - self.tokens
                self.note(
                    f"stage {self.stage}: {self.tokens:,} useful tokens of {self.positions:,} positions "
                    f"({self.tokens / self.positions:.1%} useful, {pad:,} padding)"
                )

    def eval_table(self, result: dict) -> None:
        if not self.is_main:
            return
        table = Table(title=f"held-out evaluation: {result['bench']} ({result['n']} questions)")
        for col in ("question type", "n", "accuracy", "chance"):
            table.add_column(col, justify="right" if col != "question type" else "left")
        for qtype, r in result["by_type"].items():
            table.add_row(qtype, str(r["n"]), f"{r['accuracy']:.1%}", f"{r['chance']:.1%}")
        table.add_row("[bold]overall", str(result["n"]), f"[bold]{result['accuracy']:.1%}", f"{result['chance']:.1%}")
        self.console.print(table)
        if "pope" in result:
            self.console.print(_pope_table(result["pope"]))

    def record_eval(self, summary: dict) -> None:
        """Append the evaluation to metrics.jsonl as {"eval": <bench>, **summary}: the
        record `tinylmm plot` redraws the eval chart from (the per-question answers stay
        in eval/<bench>.json)."""
        if not self.is_main:
            return
        record = {"eval": summary["bench"], **{k: v for k, v in summary.items() if k != "predictions"}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_strict(record), allow_nan=False) + "\n")

    def plot_loss(self, out_png: Path) -> Path | None:
        """plots/loss.png from metrics.jsonl; None (and a warning) when it cannot be drawn."""
        return self._plot(lambda: plots.draw_loss(plots.read_metrics(self.metrics_path), out_png), out_png)

    def plot_eval(self, summary: dict, out_png: Path) -> Path | None:
        return self._plot(lambda: plots.draw_eval(summary, out_png), out_png)

    def _plot(self, draw, out_png: Path) -> Path | None:
        # a picture is a convenience: failing to draw it must not lose the run it pictures
        if not self.is_main:
            return None
        try:
            return draw()
        except Exception as e:  # noqa: BLE001 - any failure becomes a warning
            self.warn(escape(f"could not draw {out_png}: {type(e).__name__}: {e}"))
            return None

    def close(self) -> None:
        self.end_stage()


def _pope_table(pope: dict) -> Table:
    table = Table(title="POPE (object hallucination)")
    for col in ("split", "n", "accuracy", "precision", "recall", "F1", "yes-ratio"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, r in pope.items():
        scores = (r[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
        table.add_row(split, str(r["n"]), *(f"{v:.1%}" for v in scores))
    return table


def _strict(value):
    """NaN and infinities as null: metrics.jsonl's evaluation records are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value
