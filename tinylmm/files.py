"""Writing a directory so that a failure never leaves one that looks whole: it is written
under a temporary name and renamed into place when complete, replacing what was there only
then. A write that fails (a full disk, an exception, a second Ctrl-C) removes its partial
temporary folder, which also gives back the space it took, and leaves `dest` as it was.
A SIGKILL mid-write leaves `<dest>.tmp`, which readers ignore and the next write replaces."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_atomically(dest: Path, write) -> None:
    """`write(tmp_dir)`, then `tmp_dir` becomes `dest`."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def write_file_atomically(dest: Path, text: str) -> None:
    """`text` (UTF-8) into the file `dest` the same way: a temporary file beside it, renamed
    over it when whole."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_new(src: Path, dest) -> Path:
    """Copy the file `src` to `dest` (a file, or a directory to put it in) for editing; never
    over an existing file (FileExistsError). Returns the copy's path."""
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / Path(src).name
    if dest.exists():
        raise FileExistsError(f"'{dest}' already exists; not overwriting it")
    shutil.copyfile(src, dest)
    return dest
