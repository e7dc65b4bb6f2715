"""Several datasets in one stage, balanced as Honeybee balances them.

Honeybee (Cha et al., CVPR 2024, Sec. 4, "dataset balancing"; kakaobrain/honeybee
`pipeline/data_utils/multidata_wrapper.py`) trains on a mixture whose epoch is as long as all
its datasets together, each sample drawn from dataset i with probability w_i, and compares
these choices of w:

- `per-dataset`: uniform over the datasets;
- `per-task`: uniform over the tasks (each dataset carries a `task` tag); within a task, in
  proportion to the datasets' sizes;
- `per-sample` with `cap: N`: in proportion to each dataset's size, sizes capped at N
  (Honeybee's "per-sample-100k" is `cap: 100000`); without a cap, plain concatenation;
- `weights`: hand-tuned, one `weight` per dataset (Honeybee's final recipe lists them as
  `sampling_weights` in configs/data_config/ft_default.yaml).

Honeybee draws a dataset per sample and a sample with replacement. Here the same proportions
are resolved once, before training, into a count per dataset: the epoch's length times w_i,
rounded by largest remainder so the counts add up exactly (for `per-sample`, min(size, cap)).
Each dataset then gives its count of samples as a seeded permutation of its samples,
repeated when the count exceeds the size. So the counts are exact, printed and saved in the
run directory, and the order is a function of the seed alone: a resume replays it.
A dataset's `max_samples` keeps that many of its samples (a seeded choice) before balancing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from torch.utils.data import Dataset

from tinylmm.data.llava import SkipReport
from tinylmm.errors import ConfigError, unknown

BALANCES = ("per-dataset", "per-task", "per-sample", "weights")


@dataclass(frozen=True)
class Part:
    """One dataset of a mixture, as the balancing sees it."""

    name: str  # what the counts are printed and saved under (the file, or `task`)
    task: str
    size: int  # usable samples
    weight: float | None = None
    max_samples: int | None = None

    @property
    def kept(self) -> int:
        return self.size if self.max_samples is None else min(self.size, self.max_samples)


def check_balance(balance: str, cap: int | None, weights: Sequence[float | None], where: str) -> None:
    """The mixture options fit each other: a `weight` only under `weights` (and then on every
    dataset), a `cap` only under `per-sample`, so that nothing given is silently ignored."""
    if balance not in BALANCES:
        raise unknown(f"balance in {where}", balance, BALANCES)
    if cap is not None and (balance != "per-sample" or cap < 1):
        raise ConfigError(f"{where}.cap={cap}: a cap (>= 1) belongs to balance 'per-sample' only")
    given = [w is not None for w in weights]
    if balance == "weights":
        if not all(given):
            missing = [i for i, g in enumerate(given) if not g]
            raise ConfigError(f"{where}: balance 'weights' needs a weight on every dataset; datasets{missing} lack one")
        if any(not (0 < w < math.inf) for w in weights):
            raise ConfigError(f"{where}: every weight must be positive and finite, got {list(weights)}")
    elif any(given):
        raise ConfigError(f"{where}: a dataset 'weight' is used only with balance 'weights' (balance is '{balance}')")


def shares(parts: Sequence[Part], balance: str, cap: int | None = None) -> list[float]:
    """Each part's sampling probability w_i (they sum to 1)."""
    if balance == "per-dataset":
        raw = [1.0] * len(parts)
    elif balance == "per-task":
        tasks: dict[str, int] = {}
        for p in parts:
            tasks[p.task] = tasks.get(p.task, 0) + p.kept
        raw = [(p.kept / tasks[p.task] if tasks[p.task] else 0.0) / len(tasks) for p in parts]
    elif balance == "per-sample":
        raw = [float(min(p.kept, cap) if cap else p.kept) for p in parts]
    else:
        raw = [float(p.weight) for p in parts]
    total = math.fsum(raw)
    return [r / total for r in raw]


def resolve_counts(parts: Sequence[Part], balance: str, cap: int | None = None) -> list[int]:
    """Samples per part in one epoch of the mixture."""
    if balance == "per-sample":
        return [min(p.kept, cap) if cap else p.kept for p in parts]
    total = sum(p.kept for p in parts)  # Honeybee's epoch: all datasets together
    exact = [total * w for w in shares(parts, balance, cap)]
    counts = [math.floor(x) for x in exact]
    # largest remainder first; equal ones (to float noise) in the datasets' order
    by_remainder = sorted(range(len(parts)), key=lambda i: (-round(exact[i] - counts[i], 9), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(size: int, count: int, max_samples: int | None, seed: int, index: int) -> list[int]:
    """`count` sample indices of a dataset of `size`: a seeded permutation of the kept samples,
    repeated as often as the count needs."""
    rng = random.Random(f"tinylmm-mixture:{seed}:{index}")  # str seeds hash stably (sha512)
    pool = list(range(size))
    rng.shuffle(pool)
    if max_samples is not None:
        pool = sorted(pool[:max_samples])
    out: list[int] = []
    while len(out) < count:
        order = pool[:]
        rng.shuffle(order)
        out += order[: count - len(out)]
    return out


class MixtureDataset(Dataset):
    """Datasets concatenated in their resolved counts; item i is one dataset's sample."""

    def __init__(self, datasets: Sequence, parts: Sequence[Part], balance: str, cap: int | None, seed: int):
        self.datasets, self.parts, self.balance, self.cap = list(datasets), list(parts), balance, cap
        self.counts = resolve_counts(parts, balance, cap)
        self.index: list[tuple[int, int]] = []
        for d, (part, count) in enumerate(zip(parts, self.counts)):
            self.index += [(d, j) for j in draw(part.size, count, part.max_samples, seed, d)]
        if not self.index:
            raise ConfigError("the mixture resolves to no sample (every dataset's count is 0)")
        # the unusable samples of every dataset, each id after its dataset's name
        self.report = SkipReport(f"mixture of {len(parts)} datasets")
        for part, ds in zip(parts, self.datasets):
            if hasattr(ds, "report"):
                self.report.total += ds.report.total
                self.report.skipped += [(f"{part.name}:{sid}", why) for sid, why in ds.report.skipped]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        d, j = self.index[i]
        return self.datasets[d][j]

    def sample_id(self, i: int) -> str:
        d, j = self.index[i]
        return f"{self.parts[d].name}:{self.datasets[d].sample_id(j)}"

    def num_supervised(self, i: int) -> int:
        d, j = self.index[i]
        return self.datasets[d].num_supervised(j)

    def modality_lengths(self) -> list[int]:
        """Each item's signed length (positive with images), as its dataset gives it (length grouping)."""
        lengths = [d.modality_lengths() for d in self.datasets]
        return [lengths[d][j] for d, j in self.index]

    def collate(self, items) -> dict:
        return self.datasets[0].collate(items)

    def resolved(self) -> dict:
        """What the run saves and prints: per dataset, its size, share and count."""
        w = shares(self.parts, self.balance, self.cap)
        return {
            "balance": self.balance,
            "cap": self.cap,
            "total": len(self),
            "datasets": [
                {
                    "name": p.name,
                    "task": p.task,
                    "usable": p.size,
                    "max_samples": p.max_samples,
                    "share": round(w[i], 6),
                    "count": self.counts[i],
                }
                for i, p in enumerate(self.parts)
            ],
        }

    def summary(self) -> str:
        rows = ", ".join(f"{p.name} ({p.task}) {c}" for p, c in zip(self.parts, self.counts))
        return f"mixture, balance {self.balance}" + (f" cap {self.cap}" if self.cap else "") + f": {rows}"
