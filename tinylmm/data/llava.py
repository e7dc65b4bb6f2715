"""LLaVA-format JSON datasets.

    [{"id": "...", "image": "relative/to/image_folder.jpg",     # optional: text-only
      "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}]

Samples are tokenized and checked up front (tinylmm.data.check: structure, turn order, image
paths and files, supervised tokens, length; decoding too with `verify_images`), so every
unusable sample is found before training starts, reported by id, and skipped with a count.
Images are read lazily in `__getitem__`; one that does not decode raises UnreadableImage.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from tinylmm.data.check import check_samples, read_samples
from tinylmm.data.images import UnreadableImage, load_image
from tinylmm.data.processor import Encoded, Processor, collate
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
    ):
        """The usable samples of `json_path`, checked by tinylmm.data.check (every image
        decoded too with `verify_images`); the others are in `self.report`."""
        json_path = Path(json_path)
        raw = read_samples(json_path)
        self.image_folder = Path(image_folder) if image_folder else json_path.parent
        if not self.image_folder.is_dir():
            raise DataError(f"image folder '{self.image_folder}' (for {json_path}) does not exist")
        self.processor = processor
        self.report = SkipReport(str(json_path), total=len(raw))
        checked = check_samples(
            raw,
            self.image_folder,
            processor,
            template,
            max_len,
            skipped=self.report.skipped,
            allow_outside=allow_outside_paths,
            verify_images=verify_images,
            workers=workers,
        )
        self.samples: list[tuple[str, Encoded, list[Path]]] = [(c.sid, c.encoded, c.images) for c in checked]
        if not self.samples:
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

    def __len__(self) -> int:
        return len(self.samples)

    def sample_id(self, index: int) -> str:
        return self.samples[index][0]

    def num_supervised(self, index: int) -> int:
        """Supervised tokens of a sample after the causal shift (what the loss averages over)."""
        labels = self.samples[index][1].labels
        return sum(1 for x in labels[1:] if x != -100)

    def modality_lengths(self) -> list[int]:
        """Token counts, visual tokens included: positive with images, negative text-only
        (the signed lengths of LLaVA's `modality_lengths`, for length grouping)."""
        return [len(enc.input_ids) * (1 if enc.num_images else -1) for _, enc, _ in self.samples]

    def __getitem__(self, index: int):
        sid, enc, images = self.samples[index]
        pixels = []
        for p in images:
            try:
                image = load_image(p)
            except UnreadableImage as e:  # training replaces the sample (tinylmm.train.bad_images)
                raise UnreadableImage(p, e.reason, sid) from None
            pixels.append(self.processor.image_processor(image))
        return enc, pixels

    def collate(self, items) -> dict:
        encoded = [e for e, _ in items]
        pixels = [px for _, pxs in items for px in pxs]
        return collate(encoded, pixels, self.processor.tokenizer.pad_token_id)
