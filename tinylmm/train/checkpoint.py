"""A run's checkpoint folders, each written with tinylmm.files.write_atomically, so a run
killed mid-write never leaves a checkpoint that looks whole.

    runs/<run>/<stage>/step-000040/   model + processor (loadable) + trainer_state.{json,safetensors}
    runs/<run>/<stage>/final/         model + processor
    runs/<run>/final -> <last stage>/final
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir(stage_dir: Path, step: int) -> Path:
    return stage_dir / f"step-{step:06d}"


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
