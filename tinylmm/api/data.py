"""`tinylmm data check`: the checks `tinylmm train` runs at its start (tinylmm.data.check),
on a whole file with every image decoded, under a preset's tokenizer, template and visual
tokens, before a long run. `tinylmm data instructize`: records that are not conversations
turned into LLaVA ones (tinylmm.data.instructize)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tinylmm.errors import DataError

SHOWN_IDS = 5  # sample ids shown per reason


@dataclass
class DataCheck:
    source: Path
    total: int
    usable: int
    max_len: int
    template: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample id, "reason: detail")
    truncated: list[str] = field(default_factory=list)  # usable samples cut at max_len (answers left)
    written: Path | None = None

    def by_reason(self) -> dict[str, list[tuple[str, str]]]:
        """{reason: [(sample id, detail) ...]}, the most frequent reason first."""
        out: dict[str, list[tuple[str, str]]] = {}
        for sid, text in self.skipped:
            reason, _, detail = text.partition(": ")
            out.setdefault(reason, []).append((sid, detail))
        return dict(sorted(out.items(), key=lambda kv: -len(kv[1])))


def check_data(
    file,
    images,
    *,
    preset: str = "toy",
    max_len: int | None = None,
    allow_outside_paths: bool = False,
    workers: int | None = None,
    write_usable=None,
    on_decoded: Callable[[int, int], None] | None = None,
) -> DataCheck:
    """Check every sample of the LLaVA-format `file` (images under `images`) as `tinylmm train
    --preset P` would train on it: under the preset's template and tokenizer, lengths with its
    visual tokens against `max_len` (default: the longest max_len of the preset's stages in
    the share recipe), every image decoded (`workers` processes). `write_usable`: a file that
    receives the usable samples, never `file` itself."""
    from tinylmm.config import resolve
    from tinylmm.data.check import check_samples, read_samples
    from tinylmm.files import write_file_atomically
    from tinylmm.models.assemble import build_processor

    file, images = Path(file), Path(images)
    if write_usable is not None and Path(write_usable).resolve() == file.resolve():
        raise DataError(f"--write-usable {write_usable} is the file being checked; write the usable samples elsewhere")
    raw = read_samples(file)
    if not images.is_dir():
        raise DataError(f"image folder '{images}' (for {file}) does not exist")
    cfg, _ = resolve(preset, "share")
    max_len = max_len or max(s.max_len for s in cfg.stages.values())
    if max_len <= 0:
        raise DataError(f"--max-len {max_len} must be positive")
    processor = build_processor(cfg.model)
    result = DataCheck(file, len(raw), 0, max_len, cfg.model.template)
    usable = check_samples(
        raw,
        images,
        processor,
        processor.template,
        max_len,
        skipped=result.skipped,
        allow_outside=allow_outside_paths,
        verify_images=True,
        workers=workers,
        on_decoded=on_decoded,
    )
    result.usable = len(usable)
    result.truncated = [c.sid for c in usable if len(c.encoded.input_ids) >= max_len]
    if write_usable is not None:
        if not usable:
            raise DataError(f"no usable sample in '{file}' to write to {write_usable}")
        write_file_atomically(Path(write_usable), json.dumps([raw[c.index] for c in usable], ensure_ascii=False))
        result.written = Path(write_usable)
    return result


def instructize_file(src, out, options, *, images=None):
    """tinylmm.data.instructize.instructize_file, imported when called (`tinylmm --help` stays light)."""
    from tinylmm.data import instructize

    return instructize.instructize_file(src, out, options, images=images)
