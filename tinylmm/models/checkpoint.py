"""The checkpoint format: what `TinyLMM.save` writes and `tinylmm.models.assemble.load` reads.

A checkpoint directory describes itself:

    tinylmm.json            the model spec (template, connector, image token ...), and
                            for an adapter checkpoint where its LLM base is and how stored
    llm/                    the LLM as transformers writes it (config.json + weights), or,
                            after a lora/qlora stage, its adapter as peft writes it
                            (adapter_config.json + adapter_model.safetensors)
    vision/config.json      the tower (cut at the feature layer); an open_clip tower:
                            vision/open_clip.json (models/vision/openclip.py)
    model.safetensors       vision.* and connector.* (vision LoRA weights included)
    tokenizer/              image_processor.json

An adapter checkpoint refers to the run's `llm-base/` directory (relative path) instead of
repeating the frozen base in every checkpoint; `tinylmm merge` writes a self-contained one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file, load_model, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tinylmm.models import adapters
from tinylmm.schema import to_dict

FORMAT = "tinylmm/2"
READABLE = ("tinylmm/1", FORMAT)  # tinylmm/1: every weight in model.safetensors
META = "tinylmm.json"


def save(model, directory: Path, processor) -> None:
    """Write `model` (a TinyLMM) and its processor to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = dataclasses.replace(model.spec, vision=model.vision.spec)
    meta = {
        "format": FORMAT,
        "model": to_dict(spec),
        "num_image_tokens": model.num_image_tokens,
        "llm_base": None,
        "llm_quantization": None,
        "vision_lora": None if model.vision_lora is None else to_dict(model.vision_lora),
    }
    if adapters.is_peft(model.llm):
        # Relative to where the checkpoint will live (write_atomically renames a sibling).
        final = directory.resolve().with_name(directory.name.removesuffix(".tmp"))
        meta["llm_base"] = os.path.relpath(Path(model.llm_base).resolve(), final)
        meta["llm_quantization"] = None if model.llm_quant is None else to_dict(model.llm_quant)
    model.llm.save_pretrained(directory / "llm")  # adapter only, for a peft model
    model.vision.config.save_pretrained(directory / "vision")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("llm.")}
    save_file(state, str(directory / "model.safetensors"))
    (directory / META).write_text(json.dumps(meta, indent=2))
    processor.save(directory)


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / META).exists()


def read_meta(path: Path) -> dict:
    meta_file = Path(path) / META
    if not meta_file.exists():
        raise FileNotFoundError(f"'{path}' is not a tinylmm checkpoint (no {META} there)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") not in READABLE:
        raise ValueError(f"{meta_file}: unsupported format {meta.get('format')!r} (expected one of {READABLE})")
    return meta


def llm_base(path: Path, meta: dict) -> Path | None:
    """The full-precision base an adapter checkpoint's LLM sits on (the run's llm-base/)."""
    if not meta.get("llm_base"):
        return None
    base = (Path(path).resolve() / meta["llm_base"]).resolve()
    if not (base / "config.json").exists():
        raise FileNotFoundError(
            f"{path}: its LLM base '{base}' is missing (the adapter checkpoint refers to "
            "the run's llm-base/ directory; keep the run together, or `tinylmm merge` it)"
        )
    return base


def restore_parts(model, path: Path, *, llm_too: bool = True) -> None:
    """Load a checkpoint's weights into a model of the same structure (resume; stages done
    earlier). The LLM's weights come from llm/ (full weights or the adapter)."""
    path = Path(path)
    device = model.connector.parameters().__next__().device
    state = load_file(str(path / "model.safetensors"), device=str(device))
    if read_meta(path)["format"] == "tinylmm/1":
        state = {k: v for k, v in state.items() if not k.startswith("llm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith("llm.")]
    if missing or unexpected:
        raise ValueError(
            f"{path}/model.safetensors does not match the model: missing {missing}, unexpected {unexpected}"
        )
    if not llm_too:
        return
    if adapters.is_peft(model.llm):
        from peft import set_peft_model_state_dict  # optional: only adapter checkpoints need it

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


def load_v1_llm(path: Path, quant, attn_implementation, dtype, device):
    """tinylmm/1 checkpoints kept the LLM's weights in model.safetensors as llm.*."""
    llm = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(str(path / "llm")), dtype=dtype, attn_implementation=attn_implementation
    )
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
