"""What a run shows and records: rich progress bars, notes, metrics.jsonl, the eval table."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class Reporter:
    def __init__(self, console: Console | None, is_main: bool, metrics_path: Path):
        self.console = console or Console(stderr=True)
        self.is_main = is_main
        self.metrics_path = metrics_path
        self.progress: Progress | None = None
        self.task = None
        self.t_stage = 0.0
        self.tokens = 0

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
        self.t_stage, self.tokens = time.perf_counter(), 0
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

    def step(self, stage, stage_index, step, loss, lr, grad_norm, tokens, seconds) -> None:
        self.tokens += tokens
        if not self.is_main:
            return
        elapsed = time.perf_counter() - self.t_stage
        tps = self.tokens / max(elapsed, 1e-9)
        rec = {
            "stage": stage,
            "stage_index": stage_index,
            "step": step,
            "loss": round(loss, 6),
            "lr": lr,
            "grad_norm": round(grad_norm, 4),
            "tokens": tokens,
            "tokens_per_s": round(tps, 1),
            "step_time": round(seconds, 4),
        }
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        self.progress.update(self.task, completed=step, loss=loss, lr=lr, tps=tps)

    def end_stage(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

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

    def close(self) -> None:
        self.end_stage()
