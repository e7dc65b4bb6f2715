"""Held-out shapes accuracy of several toy runs side by side, per question type, with POPE's
splits, as markdown (bench/README.md's tables).

    python bench/toy_table.py runs/share-s0 runs/share-s1 runs/base-s0 ...

Each column is a run directory (its eval/shapes.json and metrics.jsonl); the wall time of
its stages comes from metrics.jsonl (sum of the step times)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(run: Path) -> tuple[dict, float]:
    summary = json.loads((run / "eval" / "shapes.json").read_text())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(r.get("step_time", 0) for r in steps if "step" in r)
    return summary, train_s


def main(runs: list[str]) -> None:
    loaded = {Path(r).name: load(Path(r)) for r in runs}
    first = next(iter(loaded.values()))[0]
    names = list(loaded)
    print("| question type | chance | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for qtype, row in first["by_type"].items():
        cells = [f"{s['by_type'][qtype]['accuracy']:.1%}" for s, _ in loaded.values()]
        print(f"| {qtype} | {row['chance']:.1%} | " + " | ".join(cells) + " |")
    cells = [f"**{s['accuracy']:.1%}**" for s, _ in loaded.values()]
    print(f"| overall | {first['chance']:.1%} | " + " | ".join(cells) + " |")
    for split in first.get("pope", {}):
        for metric in ("accuracy", "f1", "yes_ratio"):
            cells = [f"{s['pope'][split][metric]:.1%}" for s, _ in loaded.values()]
            print(f"| POPE {split} {metric.replace('_', '-')} | | " + " | ".join(cells) + " |")
    print("| training steps' time | | " + " | ".join(f"{t:.0f} s" for _, t in loaded.values()) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
