"""A run's checkpoint folders, each written with tinylmm.files.write_atomically, so a run
killed mid-write never leaves a checkpoint that looks whole.

    runs/<run>/<stage>/step-000040/   model + processor (loadable) + trainer_state.{json,safetensors}
    runs/<run>/<stage>/final/         model + processor
    runs/<run>/final -> <last stage>/final
"""

from __future__ import annotations

import errno
import random
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import torch

from tinylmm.errors import RunStateError
from tinylmm.files import write_atomically

STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir(stage_dir: Path, step: int) -> Path:
    return stage_dir / f"step-{step:06d}"


def resume_command(run_dir: Path) -> str:
    return f"tinylmm train --resume {shlex.quote(str(run_dir))}"


def write_checkpoint(accel, dest: Path, write, run_dir: Path) -> None:
    """The main process writes `dest` atomically; every process calls this. A write that
    fails (a full disk) leaves the checkpoints written before as they were, and stops every
    process with a RunStateError that says what is intact and how to resume."""
    failure = None
    if accel.is_main_process:
        try:
            write_atomically(dest, write)
        except OSError as e:
            failure = e
    failed = failure is not None
    if accel.num_processes > 1:  # the others must not wait at the next barrier forever
        failed = bool(accel.reduce(torch.tensor(int(failed), device=accel.device), reduction="max"))
    if not failed:
        return
    if failure is None:
        raise RunStateError(f"the main process could not write {dest}")
    full = failure.errno in (errno.ENOSPC, errno.EDQUOT)
    why = "the disk is full" if full else (failure.strerror or str(failure))
    kept = sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).glob("*/step-*") if STEP_RE.match(p.name))
    kept += sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).glob("*/final") if p.is_dir())
    raise RunStateError(
        f"writing the checkpoint {dest} failed: {why} ({failure.__class__.__name__}: {failure}). Nothing "
        f"written before was touched (checkpoints: {', '.join(kept) or 'none yet'}); "
        + ("free some space, then " if full else "")
        + f"resume with: {resume_command(run_dir)}"
    )


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def latest_step(stage_dir: Path) -> Path | None:
    if not stage_dir.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in stage_dir.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir())
    return steps[-1][1] if steps else None


def link_final(run_dir: Path, stage_name: str) -> None:
    link = run_dir / "final"
    if link.is_symlink() or link.exists():
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    link.symlink_to(Path(stage_name) / "final", target_is_directory=True)
