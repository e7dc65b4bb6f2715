"""The device a run will train on, as the planner sees it: a CUDA GPU and its memory, or a
device the planner does not model (the CPU, Apple mps, Intel xpu).

The memory is the GPU's total (`torch.cuda.get_device_properties(i).total_memory`, as
tinylmm.train.loop's warning budgets it); the CUDA context and the allocator's slack are
the planner's to count (plan.py). `--tune auto` asks `detect_device()`; tests replace it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" (the one the planner models), "cpu", "mps", "xpu"
    memory: int  # bytes one process may use; 0 where the planner does not model the device
    name: str  # for people: "NVIDIA GeForce RTX 4090", "cpu" ...


def detect_device() -> Device:
    """The current CUDA device (before accelerate places the process: device 0 of those
    visible), else the first accelerator torch has, else the CPU."""
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return Device("cuda", int(props.total_memory), props.name)
    if torch.backends.mps.is_available():
        return Device("mps", 0, "Apple mps")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return Device("xpu", 0, "Intel xpu")
    return Device("cpu", 0, "cpu")
