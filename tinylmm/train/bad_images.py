"""Images that fail while training, and the run's skip report.

A sample whose image does not decode at its step (tinylmm.data.images.UnreadableImage) is
skipped, recorded, and replaced by another sample drawn from the seed, the step and the
sample's position in the global batch, so the step proceeds and the data order stays a
function of the seed: a resume draws the same replacements. The loss stays the mean over
the supervised tokens the step really trained on: the gradients, scaled for the planned
count before the step's image failures were known, are rescaled at its end
(`BadImages.settle`).

Every process records the images it met; `settle` sums them over the processes at each step
boundary, so all stop at the same step. When more distinct images than `data.max_bad_images`
(a count, or a fraction of the stage's samples below 1) have failed, the loop saves a step
checkpoint and raises the error `stop_error` words: the files, the skip report, how to
resume.

The skip report, `<run>/skipped.jsonl`, one JSON object a line:
    {"when": "start", "source": FILE, "id": ..., "reason": ..., "detail": ...}
        a sample the start-of-run check refused (tinylmm.data.check), rewritten on each start;
    {"when": "training", "stage": S, "step": N, "source": FILE, "id": ..., "reason":
     "unreadable image", "image": PATH, "detail": ..., "replaced_by": ID}
        an image that failed at step N; a resume drops the records past its checkpoint.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, Sampler

from tinylmm.data.images import UnreadableImage
from tinylmm.errors import DataError
from tinylmm.files import write_file_atomically
from tinylmm.train import checkpoint as ckpt

SKIP_REPORT = "skipped.jsonl"
MAX_DRAWS = 16  # replacements tried for one slot before the step gives up


class Slot(NamedTuple):
    step: int  # 0-based optimizer step
    position: int  # place in the step's global batch
    index: int  # the sample the data order put there


@dataclass
class Failure:
    step: int
    id: str
    image: str
    detail: str
    replaced_by: str
    token_delta: int  # supervised tokens of the replacement minus those of the sample


class SlotSampler(Sampler):
    """A stage's batch sampler with each index tagged with its step and place in the step's
    global batch (`steps` a tinylmm.train.schedule.StageSteps, micro-batches in accumulation
    order per step as StageSampler yields them)."""

    def __init__(self, inner, steps, rank: int, start_step: int):
        self.inner, self.steps, self.rank, self.start_step = inner, steps, rank, start_step

    def __iter__(self):
        acc, micro, world = self.steps.accumulation, self.steps.micro_batch, self.steps.world_size
        for k, indices in enumerate(self.inner):
            step, a = self.start_step + k // acc, k % acc
            base = (a * world + self.rank) * micro
            yield [Slot(step, base + j, i) for j, i in enumerate(indices)]

    def __len__(self) -> int:
        return len(self.inner)


class Replacing(Dataset):
    """`dataset[slot]`, with a sample whose image fails replaced: -> (item, failures)."""

    def __init__(self, dataset, seed: int, collate=None):
        self.dataset, self.seed = dataset, seed
        self.collate_items = collate  # the batch's items -> model inputs (packed; None: the dataset's padding)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, slot: Slot):
        rng = random.Random(f"{self.seed}:{slot.step}:{slot.position}")  # str seeds are stable across runs
        index, failures = slot.index, []
        for _ in range(MAX_DRAWS + 1):
            try:
                item = self.dataset[index]
            except UnreadableImage as e:
                failures.append((index, e))
                index = rng.randrange(len(self.dataset))
                continue
            delta = self.dataset.num_supervised(index) - self.dataset.num_supervised(slot.index)
            sid = self.dataset.sample_id(index)
            out = [Failure(slot.step + 1, e.sample, str(e.path), e.reason, sid, 0) for _, e in failures]
            if out:
                out[0].token_delta = delta
            return item, out
        raise DataError(
            f"step {slot.step + 1}: {MAX_DRAWS} replacement samples in a row had unreadable images (first: "
            f"{failures[0][1]}); check the image folder with: tinylmm data check"
        )

    def collate(self, items):
        collate = self.collate_items or self.dataset.collate
        return collate([item for item, _ in items]), [f for _, fs in items for f in fs]


class SkipLog:
    """The run's skip report (module docstring); written by the main process."""

    def __init__(self, run_dir: Path, is_main: bool, fresh: bool = False):
        self.path = Path(run_dir) / SKIP_REPORT
        self.is_main = is_main
        self.records = []
        if self.path.exists() and not fresh:
            lines = self.path.read_text().splitlines()
            self.records = [json.loads(line) for line in lines if line.strip()]

    def start(self, reports) -> None:
        """The start-of-run check's skips (one SkipReport per dataset), in place of a previous start's."""
        fresh = []
        for report in reports:
            for sid, text in report.skipped:
                reason, _, detail = text.partition(": ")
                fresh.append({"when": "start", "source": report.source, "id": sid, "reason": reason, "detail": detail})
        self.records = fresh + [r for r in self.records if r.get("when") == "training"]
        self._write()

    def resume(self, stage: str, step: int) -> set[str]:
        """Forget the stage's records past `step` (they come again); -> the ids that failed up to it."""
        self.records = [r for r in self.records if not (r.get("stage") == stage and r["step"] > step)]
        self._write()
        return {r["id"] for r in self.records if r.get("stage") == stage}

    def add(self, stage: str, source: str, failures: list[Failure]) -> None:
        for f in failures:
            record = {"when": "training", "stage": stage, "source": source, **asdict(f), "reason": "unreadable image"}
            record.pop("token_delta")
            self.records.append(record)
        self._write()

    def _write(self) -> None:
        if self.is_main and (self.records or self.path.exists()):  # whole or not at all: resume reads it
            write_file_atomically(self.path, "".join(json.dumps(r) + "\n" for r in self.records))


def allowed(max_bad_images: float, num_samples: int) -> float:
    """How many distinct images may fail in a stage: a count, or a fraction of its samples below 1."""
    return max_bad_images if max_bad_images >= 1 else max_bad_images * num_samples


class BadImages:
    """One stage's failed images: the sampler and dataset wrappers, the per-step settlement,
    the limit."""

    def __init__(
        self, accel, log: SkipLog, stage: str, dataset, seed: int, limit: float, start_step: int, collate=None
    ):
        self.accel, self.log, self.stage, self.dataset = accel, log, stage, dataset
        self.replacing = Replacing(dataset, seed, collate)
        self.limit = limit
        self.ids = log.resume(stage, start_step)  # distinct ids failed so far in this stage
        self.images = {r["id"]: r["image"] for r in log.records if r.get("stage") == stage}  # for the error
        self.pending: list[Failure] = []
        self.over = False

    def note(self, failures: list[Failure]) -> None:
        """A micro-batch's failures (this process)."""
        self.pending += failures

    def settle(self, planned_tokens: int, trainable) -> int:
        """At the end of a step's backward passes: record the step's failures (all processes),
        rescale the gradients to the supervised tokens really trained on; -> that count."""
        delta, found = sum(f.token_delta for f in self.pending), len(self.pending)
        if self.accel.num_processes > 1:  # every process must know: all rescale, record and stop alike
            both = self.accel.reduce(torch.tensor([delta, found], device=self.accel.device), reduction="sum")
            delta, found = (int(x) for x in both.tolist())
        if not found:
            return planned_tokens
        failures = self.pending
        if self.accel.num_processes > 1:
            from accelerate.utils import gather_object

            failures = gather_object(failures)
        self.pending = []
        self.log.add(self.stage, self.dataset.report.source, failures)
        new = {f.id for f in failures} - self.ids
        self.ids |= new
        self.images.update({f.id: f.image for f in failures})
        self.over = self.over or (bool(new) and len(self.ids) > self.limit)
        actual = planned_tokens + delta
        if delta:
            for p in trainable:
                if p.grad is not None:
                    p.grad.mul_(planned_tokens / actual)
        return actual

    def stop_error(self, step_dir: Path, run_dir: Path, max_bad_images: float) -> DataError:
        files = ", ".join(f"{self.images.get(i, '?')} (sample '{i}')" for i in sorted(self.ids))
        return DataError(
            f"stages.{self.stage}: {len(self.ids)} images failed to decode while training, more than "
            f"data.max_bad_images={max_bad_images:g} allows ({self.limit:g}): {files}. Each was skipped and "
            f"replaced; the skip report is {self.log.path}; checkpoint {step_dir}. Fix or remove the files "
            f"(tinylmm data check FILE --images DIR), or raise data.max_bad_images in {run_dir / 'config.yaml'}, "
            f"then resume with: {ckpt.resume_command(run_dir)}"
        )
