"""Where the shipped presets and recipes are: inside the wheel, or at the repository root."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource(name: str) -> Path:
    """`model_zoo.yaml` or `recipes`: the wheel's copy, else the source checkout's."""
    for base in (_PACKAGE / "resources", _PACKAGE.parent):
        path = base / name
        if path.exists():
            return path
    raise FileNotFoundError(f"tinylmm resource '{name}' is missing from {_PACKAGE} (broken install?)")


def asset(name: str) -> Path:
    """Files that live inside the package (e.g. the toy tokenizer)."""
    return _PACKAGE / "assets" / name
