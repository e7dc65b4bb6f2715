"""Pictures of a run, drawn from its metrics.jsonl: loss and lr over the stages, and each
evaluation's accuracy per question type. matplotlib is imported when a picture is drawn
(it costs start-up time) and only its object API is used: no pyplot, no global backend."""

from __future__ import annotations

import math
from pathlib import Path

from tinylmm.data.jsonl import read_jsonl


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl."""
    return read_jsonl(path)


def step_records(records: list[dict]) -> list[dict]:
    """The training-step records (metrics.jsonl also holds evaluation records)."""
    return [r for r in records if "stage" in r and "step" in r]


def stage_lengths(records: list[dict]) -> dict[str, int]:
    """Steps per stage (its highest step), in stage order."""
    order: dict[str, tuple[int, int]] = {}  # stage -> (stage_index, first appearance)
    lengths: dict[str, int] = {}
    for r in step_records(records):
        order.setdefault(r["stage"], (r.get("stage_index", len(order)), len(order)))
        lengths[r["stage"]] = max(lengths.get(r["stage"], 0), r["step"])
    return {name: lengths[name] for name in sorted(order, key=order.get)}


def stage_offsets(records: list[dict]) -> dict[str, int]:
    """Where each stage starts on the global step axis: the steps of the stages before it
    (the records count steps per stage; the pictures lay the stages end to end)."""
    offsets, total = {}, 0
    for name, length in stage_lengths(records).items():
        offsets[name] = total
        total += length
    return offsets


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _score(value) -> float:
    """A score to draw: an undefined one (null in metrics.jsonl, NaN) draws no bar."""
    return value if _finite(value) else math.nan


def draw_loss(records: list[dict], out_png) -> Path:
    """Loss (top) and learning rate (bottom) against the global step, one colour a stage,
    a vertical line and the stage's name where each stage starts. Records without a finite
    loss (a NaN step) are left out of the loss curve."""
    from matplotlib.figure import Figure

    steps = step_records(records)
    if not steps:
        raise ValueError("no training-step records to draw")
    offsets = stage_offsets(steps)
    fig = Figure(figsize=(9, 6), layout="constrained")
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True)
    for name in offsets:
        mine = [r for r in steps if r["stage"] == name]
        points = [(offsets[name] + r["step"], r["loss"]) for r in mine if _finite(r.get("loss"))]
        line = loss_ax.plot(*zip(*points))[0] if points else None
        rates = [(offsets[name] + r["step"], r["lr"]) for r in mine if _finite(r.get("lr"))]
        if rates:
            lr_ax.plot(*zip(*rates), color=line.get_color() if line else None)
    losses = [r["loss"] for r in steps if _finite(r.get("loss"))]
    # log where the loss falls by orders of magnitude; a narrow range reads better linear
    if losses and min(losses) > 0 and max(losses) > 10 * min(losses):
        loss_ax.set_yscale("log")
    for name, start in offsets.items():
        for ax in (loss_ax, lr_ax):
            if start:
                ax.axvline(start + 0.5, color="0.5", linestyle="--", linewidth=0.8)
        # x in steps, y in axes fraction: the name sits just above the top panel
        loss_ax.text(start + 0.5, 1.01, name, transform=loss_ax.get_xaxis_transform(), fontsize=9, va="bottom")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step (stages end to end)")
    lr_ax.grid(alpha=0.3)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _save(fig, out_png)


def draw_eval(summary: dict, out_png) -> Path:
    """Accuracy per question type and overall, each with its chance level; with a "pope"
    part, a second panel of its splits' accuracy, precision, recall, F1 and yes-ratio."""
    from matplotlib.figure import Figure

    pope = summary.get("pope")
    fig = Figure(figsize=(9, 8 if pope else 4.5), layout="constrained")
    axes = fig.subplots(2, 1) if pope else [fig.subplots()]
    _draw_accuracy(axes[0], summary)
    if pope:
        _draw_pope(axes[1], pope)
    return _save(fig, out_png)


OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.0, 1.0), "fontsize": 8}  # a legend right of its panel


def _draw_accuracy(ax, summary: dict) -> None:
    rows = [(qtype, r) for qtype, r in summary.get("by_type", {}).items()] + [("overall", summary)]
    xs = range(len(rows))
    colors = ["C0"] * (len(rows) - 1) + ["C1"]
    accuracy = [_score(r["accuracy"]) for _, r in rows]
    bars = ax.bar(xs, accuracy, color=colors)
    ax.bar_label(bars, labels=[f"{a:.0%}" if _finite(a) else "n/a" for a in accuracy], fontsize=8)
    chance = [(x, r["chance"]) for x, (_, r) in zip(xs, rows) if _finite(r.get("chance"))]
    for i, (x, level) in enumerate(chance):
        ax.hlines(level, x - 0.4, x + 0.4, colors="k", linestyles="--", label="chance" if i == 0 else None)
    ax.set_xticks(list(xs), [f"{name}\n(n={r['n']})" for name, r in rows], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{summary['bench']} (n={summary['n']})")
    if chance:
        ax.legend(**OUTSIDE)


POPE_BARS = {"accuracy": "accuracy", "precision": "precision", "recall": "recall", "f1": "F1", "yes_ratio": "yes-ratio"}


def _draw_pope(ax, pope: dict) -> None:
    splits = list(pope)
    width = 0.8 / len(POPE_BARS)
    for i, (key, label) in enumerate(POPE_BARS.items()):
        xs = [s + (i - (len(POPE_BARS) - 1) / 2) * width for s in range(len(splits))]
        hatch = "//" if key == "yes_ratio" else None  # not a score: higher is not better
        ax.bar(xs, [_score(pope[s][key]) for s in splits], width, label=label, hatch=hatch)
    ax.axhline(0.5, color="0.4", linestyle=":", linewidth=1, label="balanced yes-ratio")
    ax.set_xticks(range(len(splits)), [f"{s}\n(n={pope[s]['n']})" for s in splits], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_title("POPE")
    ax.legend(**OUTSIDE)


def _save(fig, out_png) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return out_png


def redraw(run_dir) -> list[Path]:
    """Every picture of a run from its metrics.jsonl alone: plots/loss.png and one
    plots/eval-<bench>.png per benchmark evaluated (its last evaluation)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist: is '{run_dir}' a tinylmm run directory?")
    records = read_metrics(path)
    written = []
    if step_records(records):
        written.append(draw_loss(records, run_dir / "plots" / "loss.png"))
    evals = {r["eval"]: r for r in records if "eval" in r}  # a later evaluation replaces an earlier one
    for bench, r in evals.items():
        summary = {k: v for k, v in r.items() if k != "eval"}
        written.append(draw_eval(summary, run_dir / "plots" / f"eval-{bench}.png"))
    return written
