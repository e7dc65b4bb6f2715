"""Turning conversations and images into model inputs: tokenizer + image processor + template."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tinylmm.data.templates import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    ChatTemplate,
    Template,
    TemplateError,
    TemplateMismatch,
    bind_template,
    tokenize_with_labels,
)
from tinylmm.data.tokenizer_files import save_tokenizer
from tinylmm.errors import did_you_mean

RESIZE_MODES = ("squash", "shortest", "shortest_floor", "longest")
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass
class ImageProcessor:
    """Optionally pad to a square with the mean colour (LLaVA's "pad" aspect mode), bring
    the image to `size` x `size`, normalise. PIL + numpy only.

    `resize` (open_clip's resize modes; a square image is simply resized in each):
      squash    resize to size x size, ignoring the aspect ratio (transformers' towers)
      shortest  resize the shorter side to `size`, centre-crop the longer one (torchvision's
                rounding of the crop offset, as open_clip's transforms)
      shortest_floor  the same with the offset floored, as transformers' CLIP processor
                (TinyLLaVA checkpoints with a CLIP tower and the "square" aspect mode)
      longest   resize the longer side to `size`, pad the shorter one centred with `fill`
    """

    size: int
    image_mean: list[float]
    image_std: list[float]
    pad_to_square: bool = True
    resize: str = "squash"
    interpolation: str = "bicubic"
    fill: list[int] = field(default_factory=lambda: [0, 0, 0])  # RGB of `longest`'s padding

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"image processor: resize '{self.resize}' is not one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"image processor: interpolation '{self.interpolation}' is not one of {', '.join(INTERPOLATIONS)}"
            )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.pad_to_square and image.width != image.height:
            side = max(image.width, image.height)
            fill = tuple(int(m * 255) for m in self.image_mean)  # truncated, as LLaVA's expand2square
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        image = self._resize(image)
        x = np.asarray(image, dtype=np.float32) / 255.0
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(x).permute(2, 0, 1).contiguous()

    def _resize(self, image: Image.Image) -> Image.Image:
        """To size x size, with torchvision's rounding (what open_clip's transforms run)."""
        s, (w, h) = self.size, image.size
        resample = INTERPOLATIONS[self.interpolation]
        if (w, h) == (s, s):
            return image
        if self.resize == "squash" or w == h:
            return image.resize((s, s), resample)
        if self.resize in ("shortest", "shortest_floor"):
            short, long = min(w, h), max(w, h)
            long = int(s * long / short)  # torchvision's Resize(int) and transformers: the longer side truncated
            w, h = (s, long) if w < h else (long, s)
            image = image.resize((w, h), resample)
            if self.resize == "shortest":
                left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
            else:
                left, top = (w - s) // 2, (h - s) // 2
            return image.crop((left, top, left + s, top + s))
        ratio = max(w, h) / s  # longest
        w, h = round(w / ratio), round(h / ratio)
        canvas = Image.new("RGB", (s, s), tuple(self.fill))
        canvas.paste(image.resize((w, h), resample), ((s - w) // 2, (s - h) // 2))
        return canvas

    def save(self, directory: Path) -> None:
        (Path(directory) / "image_processor.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> ImageProcessor:
        path = Path(directory) / "image_processor.json"
        data = json.loads(path.read_text())
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise ValueError(f"{path}: unknown key '{key}'{did_you_mean(key, names)}")
        return cls(**data)  # files written before resize/interpolation/fill existed get the defaults


class SampleError(ValueError):
    """A sample that cannot be trained on; `reason` is a short category for the skip report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int


class Processor:
    """Everything needed to feed the model: `<image>` is one token id expanded to
    `num_image_tokens` positions per image, so lengths are known before the forward pass."""

    def __init__(self, tokenizer, image_processor: ImageProcessor, template: str, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template_name = template
        self.num_image_tokens = num_image_tokens
        ensure_image_token(tokenizer)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # only used for padding; labels mask it
        self._templates: dict[str, Template | ChatTemplate] = {}
        self._checked: set = set()
        self.get_template(template)  # a template of another family fails here, before any data is read

    @property
    def template(self) -> Template | ChatTemplate:
        """The model's conversation template, bound to and checked against the tokenizer."""
        return self.get_template(self.template_name)

    def get_template(self, name: str) -> Template | ChatTemplate:
        """Template `name` (phi, llama, pretrain, auto ...) for this tokenizer; TemplateError if
        they do not fit. `auto` is the tokenizer's own chat template."""
        if name not in self._templates:
            self._templates[name] = bind_template(name, self.tokenizer)
            self._checked.add(self._templates[name])
        return self._templates[name]

    @property
    def end_token_id(self) -> int:
        """The token that ends an answer under the model's template: where generation stops."""
        return self.tokenizer.convert_tokens_to_ids(self.template.end_token(self.tokenizer))

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops at the end-of-turn token, and at the tokenizer's eos where that differs
        (a chat model's <|endoftext|> after <|im_end|>)."""
        ids = [self.end_token_id]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def encode(
        self,
        turns,
        template: Template | ChatTemplate | None = None,
        num_images: int | None = None,
        max_len: int | None = None,
        add_generation_prompt: bool = False,
    ) -> Encoded:
        """Tokenize a conversation [(role, text) ...] with labels; raise SampleError if unusable."""
        template = template or self.template
        if template not in self._checked:  # once per template object
            template.check(self.tokenizer)
            self._checked.add(template)
        if any(role == "gpt" and not text.strip() for role, text in turns):
            raise SampleError("empty answer", "an assistant turn is empty")
        try:
            text, spans = template.render(turns, template.end_token(self.tokenizer), add_generation_prompt)
        except TemplateMismatch as e:
            raise SampleError("template mismatch", str(e)) from None
        except TemplateError as e:
            raise SampleError("bad conversation", str(e)) from None
        n_img_text = text.count(IMAGE_TOKEN)
        if num_images is not None and n_img_text != num_images:
            raise SampleError("image count mismatch", f"{n_img_text} <image> in the text, {num_images} image(s)")
        ids, labels, per_span = tokenize_with_labels(self.tokenizer, text, spans, template.add_special_tokens)
        if not add_generation_prompt and (not spans or min(per_span) == 0):
            raise SampleError(
                "no supervised tokens",
                "an assistant answer maps to no token (empty answer, or template/tokenizer mismatch)",
            )
        ids, labels = self._expand_images(ids, labels)
        if max_len is not None and len(ids) > max_len:
            if self.image_token_id in ids[max_len:]:  # cutting would lose (part of) an image
                raise SampleError("truncated through an image", f"{len(ids)} tokens > max_len {max_len}")
            ids, labels = ids[:max_len], labels[:max_len]
            if all(x == IGNORE_INDEX for x in labels):
                raise SampleError("no supervised tokens", f"truncation to max_len {max_len} removed every answer")
        return Encoded(ids, labels, n_img_text)

    def _expand_images(self, ids, labels):
        out_ids, out_labels = [], []
        for i, l in zip(ids, labels):
            if i == self.image_token_id:
                out_ids += [i] * self.num_image_tokens
                out_labels += [IGNORE_INDEX] * self.num_image_tokens
            else:
                out_ids.append(i)
                out_labels.append(l)
        return out_ids, out_labels

    def prompt(self, turns, images=()) -> dict:
        """Model inputs for generation: the conversation so far, ending with a human turn."""
        enc = self.encode(turns, num_images=len(images), add_generation_prompt=True)
        batch = {
            "input_ids": torch.tensor([enc.input_ids]),
            "attention_mask": torch.ones(1, len(enc.input_ids), dtype=torch.long),
        }
        if images:
            batch["pixel_values"] = torch.stack([self.image_processor(im) for im in images])
        return batch

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        save_tokenizer(self.tokenizer, directory / "tokenizer")
        self.image_processor.save(directory)


def ensure_image_token(tokenizer) -> None:
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})


def collate(encoded: list[Encoded], pixel_values: list[torch.Tensor], pad_id: int) -> dict:
    """Right-pad a batch. `pixel_values` are the batch's images in sample order."""
    length = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if pixel_values:
        batch["pixel_values"] = torch.stack(pixel_values)
    return batch
