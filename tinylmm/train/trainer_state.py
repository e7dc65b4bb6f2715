"""A step checkpoint's trainer state without pickle: `trainer_state.safetensors` holds every
tensor (optimizer moments, RNG states), `trainer_state.json` everything else (the step, the
optimizer's param groups, the scheduler, Python's and numpy's RNG states), with each
tensor's place marked by its safetensors key.

Loading a pickle (`torch.load(weights_only=False)`) runs whatever code the file names, so a
run directory from elsewhere could execute code on `--resume`. This format is data only.
A run written by an older tinylmm (`trainer_state.pt`) is refused with what to do.

The JSON keeps what plain JSON loses: dict keys that are ints (an optimizer's parameter
ids), tuples, numpy arrays and non-finite floats are tagged objects.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tinylmm.errors import RunStateError

TENSORS = "trainer_state.safetensors"
META = "trainer_state.json"
LEGACY = "trainer_state.pt"
FORMAT = 1


def _encode(obj, tensors: dict, path: str):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise RunStateError(f"trainer state at '{path}': cannot store a {type(obj).__name__} without pickle")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__dict__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    if "__float__" in obj:
        return float(obj["__float__"])
    raise RunStateError(f"unknown tagged object in the trainer state: {sorted(obj)}")


def save(state: dict, directory: Path) -> None:
    """Write `state` (any nesting of dicts, lists, tuples, tensors, numpy arrays, scalars)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT, "state": _encode(state, tensors, "state")}
    save_file(tensors, str(Path(directory) / TENSORS))
    (Path(directory) / META).write_text(json.dumps(meta, allow_nan=False))


def load(directory: Path) -> dict:
    directory = Path(directory)
    if not (directory / META).exists():
        if (directory / LEGACY).exists():
            raise RunStateError(
                f"{directory / LEGACY}: a trainer state pickled by an older tinylmm; it is not loaded "
                "(a pickle can run code). Resume from an earlier stage's final/, or start the run again"
            )
        raise RunStateError(f"{directory}: no {META}: not a step checkpoint")
    try:
        meta = json.loads((directory / META).read_text())
        tensors = load_file(str(directory / TENSORS))
    except (OSError, ValueError) as e:
        raise RunStateError(f"{directory}: unreadable trainer state ({e})") from None
    if meta.get("format") != FORMAT:
        raise RunStateError(f"{directory / META}: trainer state format {meta.get('format')}, expected {FORMAT}")
    return _decode(meta["state"], tensors)
