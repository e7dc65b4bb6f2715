"""The combined model: vision tower -> connector -> visual tokens scattered into the
`<image>` positions of the LLM's input embeddings.

A checkpoint directory describes itself:

    tinylmm.json            the model spec (template, connector, image token ...), and
                            for an adapter checkpoint where its LLM base is and how stored
    llm/                    the LLM as transformers writes it (config.json + weights), or,
                            after a lora/qlora stage, its adapter as peft writes it
                            (adapter_config.json + adapter_model.safetensors)
    vision/config.json      the tower (cut at the feature layer); an open_clip tower:
                            vision/open_clip.json (models/openclip.py)
    model.safetensors       vision.* and connector.* (vision LoRA weights included)
    tokenizer/              image_processor.json

An adapter checkpoint refers to the run's `llm-base/` directory (relative path) instead of
repeating the frozen base in every checkpoint; `tinylmm merge` writes a self-contained one.
"""

from __future__ import annotations

import dataclasses
import json
import os
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

FORMAT = "tinylmm/2"
READABLE = ("tinylmm/1", FORMAT)  # tinylmm/1: every weight in model.safetensors


@dataclass
class LMMOutput:
    logits: torch.Tensor  # with labels: only at the supervised positions (see forward)
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
        self.llm_base: Path | None = None  # full-precision base under LLM adapters
        self.llm_quant = None  # QuantSpec of a k-bit LLM base
        self.vision_lora = None  # LoraSpec of adapters injected in the vision tower

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] -> [n_images, M, D_llm]"""
        return self.connector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        is_image = input_ids == self.image_token_id
        # The <image> row is never read (its positions take the visual tokens), so an
        # imported model keeps its vocabulary even where `<image>` lies past its table.
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
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
        """Without labels: logits at every position. With labels: the loss, and logits only
        at the positions whose next token is supervised in some sample of the batch (the
        head never runs on visual tokens and prompts: with a 100k vocabulary the logits
        are the largest tensors of a step)."""
        embeds = self.embed(input_ids, pixel_values)
        if labels is None:
            return LMMOutput(self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits)
        targets = labels[:, 1:]  # the logits at position t predict token t + 1
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        if keep.numel() == 0:
            keep = keep.new_zeros(1)  # nothing supervised: a zero loss that still has a graph
        logits = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False,
                          logits_to_keep=keep).logits
        targets = targets[:, keep]
        loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        n = int((targets != IGNORE_INDEX).sum())
        return LMMOutput(logits, loss_sum / max(n, 1), loss_sum, n)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, **kwargs) -> torch.Tensor:
        """Greedy by default; returns only the new tokens. Uses the LLM's KV cache."""
        embeds = self.embed(input_ids.to(self.device), None if pixel_values is None else pixel_values.to(self.device))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.setdefault("do_sample", False)
        pad = self.llm.config.pad_token_id
        if pad is None:  # Llama-3.x configs list several eos ids and no pad
            eos = self.llm.config.eos_token_id
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        kwargs.setdefault("pad_token_id", pad)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask.to(self.device), **kwargs)

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path, processor: Processor) -> None:
        from safetensors.torch import save_file

        from tinylmm.models import adapters

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spec = dataclasses.replace(self.spec, vision=self.vision.spec)
        meta = {"format": FORMAT, "model": to_dict(spec), "num_image_tokens": self.num_image_tokens,
                "llm_base": None, "llm_quantization": None,
                "vision_lora": None if self.vision_lora is None else to_dict(self.vision_lora)}
        if adapters.is_peft(self.llm):
            # Relative to where the checkpoint will live (write_atomically renames a sibling).
            final = directory.resolve().with_name(directory.name.removesuffix(".tmp"))
            meta["llm_base"] = os.path.relpath(Path(self.llm_base).resolve(), final)
            meta["llm_quantization"] = None if self.llm_quant is None else to_dict(self.llm_quant)
        self.llm.save_pretrained(directory / "llm")  # adapter only, for a peft model
        self.vision.config.save_pretrained(directory / "vision")
        state = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("llm.")}
        save_file(state, str(directory / "model.safetensors"))
        (directory / "tinylmm.json").write_text(json.dumps(meta, indent=2))
        processor.save(directory)


def image_processor_for(spec: VisionSpec, tower) -> ImageProcessor:
    """The preprocessing a tower expects (open_clip's own, or the transformers family's)."""
    if tower.config.model_type == "open_clip":  # open_clip's own preprocessing
        return tower.config.image_processor(spec)
    mean, std = image_mean_std(spec, tower.config.model_type)
    return ImageProcessor(size=tower.image_size, image_mean=mean, image_std=std, pad_to_square=spec.pad_to_square)


def build_model(spec: ModelSpec, *, attn_implementation: str = "sdpa", dtype=None, llm_dtype=None,
                vision_dtype=None) -> tuple[TinyLMM, Processor]:
    """Build from a preset's spec: pretrained parts via from_pretrained, inline configs at random.
    `llm_dtype` / `vision_dtype` (default `dtype`) load a part directly in that dtype."""
    torch.manual_seed(spec.seed)  # connector (and toy) initialisation is reproducible
    tokenizer = build_tokenizer(spec.llm)
    ensure_image_token(tokenizer)
    vision = build_vision(spec.vision, dtype=vision_dtype or dtype, attn_implementation=attn_implementation)
    llm = build_llm(spec.llm, dtype=llm_dtype or dtype, attn_implementation=attn_implementation)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    connector = build_connector(spec.connector, vision.hidden_size, llm.config.hidden_size)
    if dtype is not None:
        connector.to(dtype)
    model = TinyLMM(vision, connector, llm, tokenizer.convert_tokens_to_ids("<image>"), spec)
    processor = Processor(tokenizer, image_processor_for(spec.vision, vision), spec.template, model.num_image_tokens)
    return model, processor


def read_meta(path: Path) -> dict:
    meta_file = Path(path) / "tinylmm.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"'{path}' is not a tinylmm checkpoint (no tinylmm.json there)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") not in READABLE:
        raise ValueError(f"{meta_file}: unsupported format {meta.get('format')!r} (expected one of {READABLE})")
    return meta


def load(path: str | Path, *, attn_implementation: str = "sdpa", dtype=None, device=None,
         load_4bit: bool = False) -> tuple[TinyLMM, Processor]:
    """Load a checkpoint directory written by `TinyLMM.save` (e.g. runs/x/final): a full
    one, or one whose LLM is a LoRA/QLoRA adapter on the run's base. `load_4bit` loads the
    LLM (the base, under an adapter) in 4-bit NF4 for inference in less memory. A
    TinyLLaVA_Factory model directory is converted in memory (see tinylmm/convert)."""
    from transformers import AutoConfig, AutoTokenizer

    from tinylmm.config import LoraSpec, QuantSpec
    from tinylmm.convert import tinyllava
    from tinylmm.models import adapters, openclip
    from tinylmm.models.loading import quiet_libraries
    from tinylmm.models.vision import VisionTower, _vision_classes

    quiet_libraries()
    path = Path(path)
    if not (path / "tinylmm.json").exists() and tinyllava.is_tinyllava_dir(path):
        return tinyllava.load(path, attn_implementation=attn_implementation, dtype=dtype, device=device,
                              load_4bit=load_4bit)
    meta = read_meta(path)
    spec = from_dict(ModelSpec, meta["model"], str(path / "tinylmm.json"))
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    quant = from_dict(QuantSpec, meta["llm_quantization"]) if meta.get("llm_quantization") else None
    if load_4bit and (quant is None or quant.bits != 4):
        quant = QuantSpec()
    if meta["format"] == "tinylmm/1":
        llm = _load_v1_llm(path, quant, attn_implementation, dtype, device)
    elif meta.get("llm_base"):
        from peft import PeftModel

        base = (path.resolve() / meta["llm_base"]).resolve()
        if not (base / "config.json").exists():
            raise FileNotFoundError(f"{path}: its LLM base '{base}' is missing (the adapter checkpoint refers to "
                                    "the run's llm-base/ directory; keep the run together, or `tinylmm merge` it)")
        llm = adapters.load_llm(base, quant=quant, device=device, attn_implementation=attn_implementation, dtype=dtype)
        llm = PeftModel.from_pretrained(llm, str(path / "llm"))
    else:
        llm = adapters.load_llm(path / "llm", quant=quant, device=device, attn_implementation=attn_implementation,
                                dtype=dtype)
    if (path / "vision" / openclip.CONFIG_FILE).exists():
        tower = openclip.load_tower(path / "vision", spec.vision)
    else:
        vis_cfg = AutoConfig.from_pretrained(str(path / "vision"))
        vis_cfg._attn_implementation = attn_implementation
        tower = VisionTower(_vision_classes()[vis_cfg.model_type][1](vis_cfg), spec.vision)
    connector = build_connector(spec.connector, tower.hidden_size, llm.config.hidden_size)
    model = TinyLMM(tower, connector, llm, tokenizer.convert_tokens_to_ids("<image>"), spec)
    if meta.get("llm_base"):
        model.llm_base = (path.resolve() / meta["llm_base"]).resolve()
        model.llm_quant = quant
    if meta.get("vision_lora"):
        adapters.attach_vision_lora(model, from_dict(LoraSpec, meta["vision_lora"]))
    restore_parts(model, path, llm_too=False)
    if dtype is not None:
        for part in (model.vision, model.connector):
            part.to(dtype)
    if device is not None:
        model.to(device)
    processor = Processor(tokenizer, ImageProcessor.load(path), spec.template, model.num_image_tokens)
    return model.eval(), processor


def restore_parts(model: TinyLMM, path: Path, *, llm_too: bool = True) -> None:
    """Load a checkpoint's weights into a model of the same structure (resume; stages done
    earlier). The LLM's weights come from llm/ (full weights or the adapter)."""
    from safetensors.torch import load_file, load_model

    from tinylmm.models import adapters

    path = Path(path)
    device = model.connector.parameters().__next__().device
    state = load_file(str(path / "model.safetensors"), device=str(device))
    if read_meta(path)["format"] == "tinylmm/1":
        state = {k: v for k, v in state.items() if not k.startswith("llm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith("llm.")]
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors does not match the model: missing {missing}, "
                         f"unexpected {unexpected}")
    if not llm_too:
        return
    if adapters.is_peft(model.llm):
        from peft import set_peft_model_state_dict

        adapter = path / "llm" / "adapter_model.safetensors"
        if not adapter.exists():
            raise ValueError(f"{path}: the model has LLM adapters but the checkpoint has none ({adapter})")
        result = set_peft_model_state_dict(model.llm, load_file(str(adapter), device=str(device)))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{adapter} does not match the adapters: unexpected {result.unexpected_keys}")
    else:
        weights = path / "llm" / "model.safetensors"
        if not weights.exists():
            raise ValueError(f"{path}: no full LLM weights in llm/ (is it an adapter checkpoint?)")
        missing, unexpected = load_model(model.llm, str(weights), strict=False, device=str(device))
        if unexpected or [m for m in missing if not _tied(model, "llm." + m)]:
            raise ValueError(f"{weights} does not match the LLM: missing {missing}, unexpected {unexpected}")


def _load_v1_llm(path: Path, quant, attn_implementation, dtype, device):
    """tinylmm/1 checkpoints kept the LLM's weights in model.safetensors as llm.*."""
    import tempfile

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from tinylmm.models import adapters

    llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path / "llm")), dtype=dtype,
                                           attn_implementation=attn_implementation)
    state = {k[4:]: v for k, v in load_file(str(path / "model.safetensors")).items() if k.startswith("llm.")}
    llm.load_state_dict(state, strict=False)
    llm.tie_weights()
    if quant is None:
        return llm
    with tempfile.TemporaryDirectory() as tmp:
        llm.save_pretrained(tmp)
        return adapters.load_llm(Path(tmp), quant=quant, device=device, attn_implementation=attn_implementation)


def _tied(model: nn.Module, name: str) -> bool:
    """safetensors stores a tied weight once; the other name is legitimately 'missing'."""
    return name.endswith("lm_head.weight") and getattr(model.llm.config, "tie_word_embeddings", False)
