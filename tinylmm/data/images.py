"""Reading a sample's image files: where a path may point, and whether a file decodes.

Paths stay inside the image folder: an `image` entry is a path relative to the folder, and
one that is absolute or climbs out of it with `..` is refused (the check is lexical, on the
normalised path) unless `data.allow_outside_paths` is set. Symlinks inside the folder are
followed and not refused: the data file names the paths, but the folder's contents are the
user's own, and LLaVA / ShareGPT4V layouts commonly link `data/coco`, `data/sam` ... to where
the downloads live (resolving links before the check would refuse exactly those).

`decode_error` is the task of `find_unreadable`'s worker processes (tinylmm.data.check).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from tinylmm.errors import DataError


class OutsidePath(ValueError):
    """An image path that leaves the image folder."""


class UnreadableImage(DataError):
    """An image file that exists but does not decode; `sample` is the id of the sample it belongs to."""

    def __init__(self, path, reason: str, sample: str | None = None):
        where = f"sample '{sample}': " if sample is not None else ""
        super().__init__(f"{where}cannot read image '{path}': {reason}")
        self.path, self.reason, self.sample = Path(path), reason, sample


def image_path(folder: Path, entry: str, allow_outside: bool = False) -> Path:
    """`entry` (a sample's `image` value) as a path under `folder`; OutsidePath if it is absolute
    or leaves the folder with `..` and `allow_outside` is off."""
    if "\0" in entry:
        raise OutsidePath(f"{entry!r} holds a NUL character")
    if os.path.isabs(entry):
        if allow_outside:
            return Path(entry)
        raise OutsidePath(f"'{entry}' is an absolute path (data.allow_outside_paths permits it)")
    rel = os.path.normpath(entry)
    if (rel == ".." or rel.startswith(".." + os.sep)) and not allow_outside:
        raise OutsidePath(f"'{entry}' leaves the image folder {folder} (data.allow_outside_paths permits it)")
    return Path(folder) / rel


def load_image(path: Path) -> Image.Image:
    """The decoded image at `path`; UnreadableImage if it does not decode. Any exception PIL
    raises on the file's bytes is the file's fault (corrupt files raise OSError, SyntaxError,
    struct.error, IndexError ... depending on the format's plugin)."""
    try:
        with Image.open(path) as im:
            im.load()
        return im  # decoded: usable after its file is closed
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise UnreadableImage(path, f"{type(e).__name__}: {e}") from None


def decode_error(path: str) -> str | None:
    """Why the image at `path` does not decode, or None if it does (a worker's task)."""
    try:
        load_image(Path(path))
    except UnreadableImage as e:
        return e.reason
    return None
