"""The combined model: vision tower -> connector -> visual tokens scattered into the
`<image>` positions of the LLM's input embeddings.

A checkpoint directory describes itself:

    tinylmm.json            the model spec (template, connector, image token ...)
    llm/config.json         the LLM architecture     vision/config.json   the tower (cut)
    model.safetensors       all weights: llm.*, vision.*, connector.*
    tokenizer/              image_processor.json
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tinylmm.config import ConnectorSpec, ModelSpec, VisionSpec, from_dict, to_dict
from tinylmm.data.templates import IGNORE_INDEX
from tinylmm.models.connectors import build_connector
from tinylmm.models.llm import build_llm, build_tokenizer
from tinylmm.models.vision import build_vision, image_mean_std
from tinylmm.processor import ImageProcessor, Processor, ensure_image_token

FORMAT = "tinylmm/1"


@dataclass
class LMMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # mean over supervised tokens
    loss_sum: torch.Tensor | None = None  # sum over supervised tokens (for token-weighted steps)
    num_tokens: int = 0


class TinyLMM(nn.Module):
    def __init__(self, vision: nn.Module, connector: nn.Module, llm: nn.Module, image_token_id: int,
                 spec: ModelSpec):
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id
        self.spec = spec
        self.num_image_tokens = connector.output_len(vision.num_patches)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] -> [n_images, M, D_llm]"""
        return self.connector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        n_positions = int(is_image.sum())
        if pixel_values is None or pixel_values.numel() == 0:
            if n_positions:
                raise ValueError(f"{n_positions} <image> positions but no pixel_values")
            return embeds
        visual = self.encode_images(pixel_values).to(embeds.dtype)
        if visual.shape[0] * visual.shape[1] != n_positions:
            raise ValueError(
                f"{n_positions} <image> positions for {visual.shape[0]} image(s) x {visual.shape[1]} tokens"
            )
        # Row-major order: the k-th image of the batch fills the k-th run of <image> positions.
        return embeds.masked_scatter(is_image.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None) -> LMMOutput:
        embeds = self.embed(input_ids, pixel_values)
        logits = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
        if labels is None:
            return LMMOutput(logits)
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        loss_sum = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        n = int((shift_labels != IGNORE_INDEX).sum())
        return LMMOutput(logits, loss_sum / max(n, 1), loss_sum, n)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, **kwargs) -> torch.Tensor:
        """Greedy by default; returns only the new tokens. Uses the LLM's KV cache."""
        embeds = self.embed(input_ids.to(self.device), None if pixel_values is None else pixel_values.to(self.device))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.llm.config.pad_token_id or self.llm.config.eos_token_id)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask.to(self.device), **kwargs)

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path, processor: Processor) -> None:
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spec = dataclasses.replace(self.spec, vision=self.vision.spec)
        meta = {"format": FORMAT, "model": to_dict(spec), "num_image_tokens": self.num_image_tokens}
        (directory / "tinylmm.json").write_text(json.dumps(meta, indent=2))
        self.llm.config.save_pretrained(directory / "llm")
        self.vision.config.save_pretrained(directory / "vision")
        save_model(self, str(directory / "model.safetensors"))
        processor.save(directory)


def _image_processor(spec: VisionSpec, tower) -> ImageProcessor:
    mean, std = image_mean_std(spec, tower.config.model_type)
    return ImageProcessor(size=tower.image_size, image_mean=mean, image_std=std, pad_to_square=spec.pad_to_square)


def build_model(spec: ModelSpec, *, attn_implementation: str = "sdpa", dtype=None) -> tuple[TinyLMM, Processor]:
    """Build from a preset's spec: pretrained parts via from_pretrained, inline configs at random."""
    torch.manual_seed(spec.seed)  # connector (and toy) initialisation is reproducible
    tokenizer = build_tokenizer(spec.llm)
    ensure_image_token(tokenizer)
    vision = build_vision(spec.vision, dtype=dtype, attn_implementation=attn_implementation)
    llm = build_llm(spec.llm, dtype=dtype, attn_implementation=attn_implementation)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    connector = build_connector(spec.connector, vision.hidden_size, llm.config.hidden_size)
    if dtype is not None:
        connector.to(dtype)
    model = TinyLMM(vision, connector, llm, tokenizer.convert_tokens_to_ids("<image>"), spec)
    processor = Processor(tokenizer, _image_processor(spec.vision, vision), spec.template, model.num_image_tokens)
    return model, processor


def load(path: str | Path, *, attn_implementation: str = "sdpa", dtype=None, device=None) -> tuple[TinyLMM, Processor]:
    """Load a checkpoint directory written by `TinyLMM.save` (e.g. runs/x/final)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tinylmm.models.vision import VisionTower, _vision_classes

    path = Path(path)
    meta_file = path / "tinylmm.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"'{path}' is not a tinylmm checkpoint (no tinylmm.json there)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: unsupported format {meta.get('format')!r} (expected {FORMAT})")
    spec = from_dict(ModelSpec, meta["model"], str(meta_file))
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    llm_cfg = AutoConfig.from_pretrained(str(path / "llm"))
    llm = AutoModelForCausalLM.from_config(llm_cfg, dtype=dtype, attn_implementation=attn_implementation)
    vis_cfg = AutoConfig.from_pretrained(str(path / "vision"))
    vis_cfg._attn_implementation = attn_implementation
    tower = VisionTower(_vision_classes()[vis_cfg.model_type][1](vis_cfg), spec.vision)
    connector = build_connector(spec.connector, tower.hidden_size, llm_cfg.hidden_size)
    model = TinyLMM(tower, connector, llm, tokenizer.convert_tokens_to_ids("<image>"), spec)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if unexpected or [m for m in missing if not _tied(model, m)]:
        raise ValueError(f"{path}/model.safetensors does not match the model: missing {missing}, unexpected {unexpected}")
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    processor = Processor(tokenizer, ImageProcessor.load(path), spec.template, model.num_image_tokens)
    return model.eval(), processor


def _tied(model: nn.Module, name: str) -> bool:
    """safetensors stores a tied weight once; the other name is legitimately 'missing'."""
    return name.endswith("lm_head.weight") and getattr(model.llm.config, "tie_word_embeddings", False)
