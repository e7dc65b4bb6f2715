"""Step arithmetic (`stage_steps`), the data order, and the learning-rate schedule of one stage."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from tinylmm.errors import ConfigError
from tinylmm.schema import StageConfig


@dataclass(frozen=True)
class StageSteps:
    num_samples: int
    global_batch: int
    micro_batch: int
    world_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)


def fit_micro_batch(batch_size: int, micro: int, world_size: int, where: str) -> int:
    """The largest micro-batch <= `micro` such that micro x processes divides the global
    `batch_size` (which stays global: the accumulation steps make up the rest)."""
    if batch_size % world_size:
        raise ConfigError(
            f"{where}: batch_size {batch_size} cannot be split evenly over {world_size} processes; "
            f"make it a multiple of {world_size}"
        )
    per_process = batch_size // world_size
    return max(m for m in range(1, min(micro, per_process) + 1) if per_process % m == 0)


def fit_micro_batches(cfg, world_size: int) -> list[tuple[str, int, int]]:
    """Lower each stage's micro-batch where the processes need it (`fit_micro_batch`), in
    place. -> (stage, old, new) for each stage changed."""
    changed = []
    for name, stage in cfg.stages.items():
        new = fit_micro_batch(stage.batch_size, stage.micro_batch_size, world_size, f"stages.{name}")
        if new != stage.micro_batch_size:
            changed.append((name, stage.micro_batch_size, new))
            stage.micro_batch_size = new
    return changed


def stage_steps(stage: StageConfig, num_samples: int, world_size: int, where: str) -> StageSteps:
    per_step = stage.micro_batch_size * world_size
    if stage.batch_size % per_step:
        raise ConfigError(
            f"{where}: batch_size {stage.batch_size} is not a multiple of micro_batch_size "
            f"{stage.micro_batch_size} x {world_size} processes"
        )
    if num_samples < stage.batch_size:
        raise ConfigError(f"{where}: batch_size {stage.batch_size} exceeds the {num_samples} usable samples")
    steps_per_epoch = num_samples // stage.batch_size  # the incomplete last batch is dropped
    total = math.ceil(stage.epochs * steps_per_epoch)
    if stage.max_steps is not None:
        total = min(total, stage.max_steps)
    warmup = math.ceil(stage.warmup_ratio * total)
    return StageSteps(num_samples, stage.batch_size, stage.micro_batch_size, world_size, steps_per_epoch, total, warmup)


def step_indices(steps: StageSteps, step: int, seed: int, grouping=None) -> list[int]:
    """The samples of optimizer step `step` (all processes): a fresh permutation per epoch,
    or `grouping`'s order (tinylmm.train.grouping: by modality and length)."""
    epoch, pos = divmod(step, steps.steps_per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if grouping is None:
        perm = torch.randperm(steps.num_samples, generator=g)
    else:
        perm = grouping.epoch_order(g, steps.global_batch, (seed, epoch))
    return perm[pos * steps.global_batch : (pos + 1) * steps.global_batch].tolist()


def micro_batches(steps: StageSteps, indices: list[int], rank: int) -> list[list[int]]:
    """This process's micro-batches of one step, in accumulation order."""
    chunk = steps.micro_batch * steps.world_size
    out = []
    for a in range(steps.accumulation):
        part = indices[a * chunk : (a + 1) * chunk]
        out.append(part[rank * steps.micro_batch : (rank + 1) * steps.micro_batch])
    return out


class StageSampler(Sampler):
    """Yields this process's micro-batches from `start_step` on (so a resumed run sees the
    same data in the same order), for a DataLoader's `batch_sampler`."""

    def __init__(self, steps: StageSteps, seed: int, rank: int, start_step: int = 0, grouping=None):
        self.steps, self.seed, self.rank, self.start_step = steps, seed, rank, start_step
        self.grouping = grouping

    def __iter__(self):
        for step in range(self.start_step, self.steps.total_steps):
            indices = step_indices(self.steps, step, self.seed, self.grouping)
            yield from micro_batches(self.steps, indices, self.rank)

    def __len__(self) -> int:
        return (self.steps.total_steps - self.start_step) * self.steps.accumulation


def lr_lambda(kind: str, warmup: int, total: int):
    """Linear warmup, then cosine / linear decay to 0, or constant."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f
