"""`tinylmm data instructize`: a VQA / multiple-choice / caption / referring-expression file
turned into a LLaVA conversation file (tinylmm/data/instructize.py has the rules)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tinylmm.errors import DataError


def instructize_file(src, out, options, *, images=None):
    """Instructize the records of `src` (JSON, JSON lines or CSV) into the LLaVA JSON `out`,
    written whole or not at all. `options`: an InstructOptions, or a dict of its fields.
    `images`: the image folder, for boxes given in pixels without the image's size.
    Returns (out, report)."""
    from PIL import Image

    from tinylmm.data.instructize import InstructOptions, instructize, read_records

    if isinstance(options, dict):
        options = InstructOptions(**options)

    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise DataError(f"--out '{out}' is the input file; write the conversations elsewhere")
    image_sizes = None
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise DataError(f"image folder '{folder}' does not exist")

        def image_sizes(rel: str) -> tuple[int, int]:
            path = folder / rel
            try:
                with Image.open(path) as im:
                    return im.size
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read the size of image '{path}': {e}") from None

    samples, report = instructize(read_records(src), options, source=str(src), image_sizes=image_sizes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, out)  # a failed write leaves an earlier `out` as it was
    finally:
        tmp.unlink(missing_ok=True)
    return out, report
