"""LLaVA-format JSON datasets.

    [{"id": "...", "image": "relative/to/image_folder.jpg",     # optional: text-only
      "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}]

Samples are tokenized and checked up front (tinylmm.data.check: structure, turn order, image
paths and files, supervised tokens, length; decoding too with `verify_images`), so every
unusable sample is found before training starts, reported by id, and skipped with a count.
The tokens are kept in the tokenized cache (tinylmm.data.token_cache: memory-mapped, tokenized
once per data file, tokenizer, template and max_len), so a later run, a resume and every
process of a multi-process run map them instead of tokenizing again, and hold no Python
object per sample. Images are read lazily in `__getitem__`; one that does not decode raises
UnreadableImage.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from tinylmm.data import token_cache
from tinylmm.data.check import UNREADABLE, find_unreadable, read_samples, sample_files, sample_id, tokenize_sample
from tinylmm.data.images import UnreadableImage, image_path, load_image
from tinylmm.data.processor import Encoded, Processor, SampleError, collate
from tinylmm.data.templates import ChatTemplate, Template, tokenizer_name
from tinylmm.errors import DataError


@dataclass
class SkipReport:
    source: str
    total: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample id, reason: detail)

    def counts(self) -> Counter:
        return Counter(reason.split(":")[0] for _, reason in self.skipped)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.source}: all {self.total} samples usable"
        parts = ", ".join(f"{n} {r}" for r, n in self.counts().most_common())
        return f"{self.source}: skipped {len(self.skipped)} of {self.total} samples ({parts})"


class LlavaDataset(Dataset):
    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path | None,
        processor: Processor,
        template: Template | ChatTemplate,
        max_len: int,
        *,
        verify_images: bool = False,
        allow_outside_paths: bool = False,
        workers: int | None = None,
        cache: bool = True,
        num_proc: int | None = None,
    ):
        """The usable samples of `json_path`, checked by tinylmm.data.check (every image
        decoded too with `verify_images`); the others are in `self.report`. The tokens come from
        the tokenized cache (tinylmm.data.token_cache), built first on a miss with `num_proc`
        processes (default: `workers`); `cache=False` builds them for this dataset alone."""
        json_path = Path(json_path)
        if not json_path.is_file():
            read_samples(json_path)  # the error that names what is wrong with the path
        self.image_folder = Path(image_folder) if image_folder else json_path.parent
        if not self.image_folder.is_dir():
            raise DataError(f"image folder '{self.image_folder}' (for {json_path}) does not exist")
        self.processor = processor
        self.store, self.built = self._tokens(json_path, template, max_len, cache, num_proc or workers or 1)
        self.report = SkipReport(str(json_path), total=len(self.store) + len(self.store.skipped))
        bad = [(pos, sid, text) for pos, sid, text in self.store.skipped]  # what the tokens say, cached
        keep = []
        for i in range(len(self.store)):  # the image files, checked on every run
            sid, entries = self.store.names(i)
            try:
                sample_files(entries, self.image_folder, allow_outside_paths)
            except SampleError as e:
                bad.append((self.store.position(i), sid, f"{e.reason}: {e.detail}"))
                continue
            keep.append(i)
        if verify_images and keep:
            paths = {i: self._images(i) for i in keep if self.store.num_images(i)}
            failed = find_unreadable(sorted({p for ps in paths.values() for p in ps}), workers)
            for i in [i for i, ps in paths.items() if any(p in failed for p in ps)]:
                path = next(p for p in paths[i] if p in failed)
                bad.append((self.store.position(i), self.store.names(i)[0], f"{UNREADABLE}: {path}: {failed[path]}"))
            keep = [i for i in keep if not any(p in failed for p in paths.get(i, ()))]
        self.report.skipped.extend((sid, text) for _, sid, text in sorted(bad, key=lambda b: b[0]))
        self.keep = np.asarray(keep, dtype=np.int64)  # dataset index -> store index: 8 bytes a sample
        if not len(self.keep):
            masked = {"no supervised tokens", "template mismatch"}
            if self.report.skipped and set(self.report.counts()) <= masked:
                # Every answer masked: training would run at loss 0 and learn nothing.
                raise DataError(
                    f"no sample of '{json_path}' has a supervised token under template '{template.name}' with "
                    f"tokenizer '{tokenizer_name(processor.tokenizer)}' (a template of another model family, or "
                    f"max_len {max_len} too short for every answer); first: {self.report.skipped[:3]}"
                )
            raise DataError(
                f"no usable sample in '{json_path}': {self.report.summary()}; first: {self.report.skipped[:3]}"
            )

    def _tokens(self, json_path: Path, template, max_len: int, cache: bool, num_proc: int):
        """The tokenized store of this file (mapped from the cache, or built there first)."""
        raw: list = []
        processor = self.processor

        def load() -> int:
            raw.extend(read_samples(json_path))
            return len(raw)

        def encode(i: int):
            sid = sample_id(raw[i], i)
            try:
                entries, enc = tokenize_sample(raw[i], processor, template, max_len)
            except SampleError as e:
                return sid, [], e
            return sid, entries, enc

        root = None
        if not cache:  # built for this dataset alone, in a folder that goes when it does
            self._scratch = tempfile.TemporaryDirectory(prefix="tinylmm-tokens-")
            root = self._scratch.name
        return token_cache.open_or_build(
            json_path, processor, template, max_len, load, encode, num_proc=num_proc, root=root
        )

    def _images(self, i: int) -> list[Path]:
        """Store sample i's image files (checked inside the folder at the start)."""
        return [image_path(self.image_folder, p, allow_outside=True) for p in self.store.names(i)[1]]

    def __len__(self) -> int:
        return len(self.keep)

    def sample_id(self, index: int) -> str:
        return self.store.names(int(self.keep[index]))[0]

    def encoded(self, index: int) -> Encoded:
        return self.store.encoded(int(self.keep[index]))

    def num_supervised(self, index: int) -> int:
        """Supervised tokens of a sample after the causal shift (what the loss averages over)."""
        return self.store.num_supervised(int(self.keep[index]))

    def modality_lengths(self) -> list[int]:
        """Token counts, visual tokens included: positive with images, negative text-only
        (the signed lengths of LLaVA's `modality_lengths`, for length grouping)."""
        st = self.store
        return [st.length(int(i)) * (1 if st.num_images(int(i)) else -1) for i in self.keep]

    def __getitem__(self, index: int):
        i = int(self.keep[index])
        sid = self.store.names(i)[0]
        pixels = []
        for p in self._images(i):
            try:
                image = load_image(p)
            except UnreadableImage as e:  # training replaces the sample (tinylmm.train.bad_images)
                raise UnreadableImage(p, e.reason, sid) from None
            pixels.append(self.processor.image_processor(image))
        return self.store.encoded(i), pixels

    def collate(self, items) -> dict:
        encoded = [e for e, _ in items]
        pixels = [px for _, pxs in items for px in pxs]
        return collate(encoded, pixels, self.processor.tokenizer.pad_token_id)
