"""LLaVA-format JSON datasets.

    [{"id": "...", "image": "relative/to/image_folder.jpg",     # optional: text-only
      "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}]

Samples are tokenized up front (fast tokenizers, no images), so every unusable sample
is found before training starts, reported by id, and skipped with a count.
Images are read lazily in `__getitem__`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from tinylmm.data.processor import Encoded, Processor, SampleError, collate
from tinylmm.data.templates import ChatTemplate, Template, tokenizer_name
from tinylmm.errors import DataError

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


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


def _images_of(sample: dict) -> list[str]:
    image = sample.get("image")
    if image is None:
        return []
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise SampleError("bad image", f"'image' must be a path or a list of paths, got {image!r:.80}")
    return images


def _sample_id(sample, index: int) -> str:
    """The sample's `id` (a string or a number), else its position in the file: `#<index>`."""
    sid = sample.get("id") if isinstance(sample, dict) else None
    if isinstance(sid, (str, int, float)) and not isinstance(sid, bool) and str(sid).strip():
        return str(sid)
    return f"#{index}"


def _turns(sample: dict) -> list[tuple[str, str]]:
    convs = sample.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise SampleError("bad conversation", "no 'conversations' list")
    turns = []
    for i, turn in enumerate(convs):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        role = ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise SampleError("bad conversation", f"turn {i} needs 'from' (human/gpt) and a string 'value'")
        try:
            turn["value"].encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud800": a lone surrogate, no character at all
            raise SampleError("bad conversation", f"turn {i}: 'value' is not valid Unicode text") from None
        turns.append((role, turn["value"]))
    if turns[0][0] == "gpt":  # some LLaVA data opens with the assistant; TinyLLaVA drops it too
        turns = turns[1:]
    return turns


class LlavaDataset(Dataset):
    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path | None,
        processor: Processor,
        template: Template | ChatTemplate,
        max_len: int,
    ):
        json_path = Path(json_path)
        if not json_path.exists():
            raise DataError(f"dataset file '{json_path}' does not exist")
        try:
            raw = json.loads(json_path.read_bytes())  # bytes: json finds UTF-8/16/32 itself
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"dataset file '{json_path}' is not valid JSON: {e}") from None
        except (OSError, RecursionError) as e:  # a directory; nesting deeper than the parser goes
            raise DataError(f"dataset file '{json_path}' cannot be read: {getattr(e, 'strerror', None) or e}") from None
        if not isinstance(raw, list):
            raise DataError(f"dataset file '{json_path}' must hold a JSON list of samples")
        if not raw:
            raise DataError(f"dataset file '{json_path}' holds no samples (an empty list)")
        self.image_folder = Path(image_folder) if image_folder else json_path.parent
        if not self.image_folder.is_dir():
            raise DataError(f"image folder '{self.image_folder}' (for {json_path}) does not exist")
        self.processor = processor
        self.report = SkipReport(str(json_path), total=len(raw))
        self.samples: list[tuple[str, Encoded, list[Path]]] = []
        for i, sample in enumerate(raw):
            sid = _sample_id(sample, i)
            try:
                if not isinstance(sample, dict):
                    raise SampleError("bad conversation", "sample is not a JSON object")
                images = [self.image_folder / p for p in _images_of(sample)]
                for p in images:
                    if not p.is_file():
                        raise SampleError("missing image", str(p))
                enc = processor.encode(_turns(sample), template, num_images=len(images), max_len=max_len)
            except SampleError as e:
                self.report.skipped.append((sid, f"{e.reason}: {e.detail}"))
                continue
            self.samples.append((sid, enc, images))
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
                with Image.open(p) as im:
                    pixels.append(self.processor.image_processor(im))
            except (OSError, ValueError, Image.DecompressionBombError) as e:  # unreadable, not an image, too large
                raise DataError(f"sample '{sid}': cannot read image '{p}': {e}") from None
        return enc, pixels

    def collate(self, items) -> dict:
        encoded = [e for e, _ in items]
        pixels = [px for _, pxs in items for px in pxs]
        return collate(encoded, pixels, self.processor.tokenizer.pad_token_id)
