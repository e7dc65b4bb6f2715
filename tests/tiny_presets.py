"""Tiny random versions of the zoo's presets: the same architecture classes, config flags,
feature layer, selection, connector and template, at widths a CPU test runs in seconds."""

from __future__ import annotations

import copy
import dataclasses

from tinylmm.config import ModelSpec
from tinylmm.models.arch import arch_config

from conftest import is_openclip

# Widths only: every other key of the real config (rope, biases, norms, soft-capping, tied
# head, partial rotary, sliding windows, ...) is kept, so the real classes take the same paths.
LLM_SIZE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024
)
VISION_SIZE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
)


def tiny_llm_config(real: dict, vocab_size: int, special_ids: dict) -> dict:
    cfg = copy.deepcopy(real)
    for key in ("architectures", "transformers_version", "_name_or_path", "auto_map", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    heads, kv = (
        real.get("num_attention_heads", 1),
        real.get("num_key_value_heads") or real.get("num_attention_heads", 1),
    )
    cfg.update(LLM_SIZE, vocab_size=vocab_size, **special_ids)
    cfg["num_key_value_heads"] = 2 if kv < heads else 4  # keep grouped-query attention where the real one has it
    if "head_dim" in real:  # Qwen3, Gemma-2, Llama-3.2: an explicit head size
        cfg["head_dim"] = 16
    if "query_pre_attn_scalar" in real:  # Gemma-2 scales queries by its head size
        cfg["query_pre_attn_scalar"] = 16
    if isinstance(real.get("layer_types"), list):
        cfg["layer_types"] = real["layer_types"][: LLM_SIZE["num_hidden_layers"]]
    if "max_window_layers" in real:
        cfg["max_window_layers"] = min(real["max_window_layers"], LLM_SIZE["num_hidden_layers"])
    if real.get("sliding_window"):
        cfg["sliding_window"] = 16  # shorter than the test prompts: the windowed path runs
    return cfg


def tiny_vision_config(real: dict) -> dict:
    cfg = {
        k: v
        for k, v in real.items()
        if k not in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype")
    }
    cfg.update(VISION_SIZE)
    if "mlp_ratio" in real:  # DINOv2: the MLP's width is hidden_size x mlp_ratio
        del cfg["intermediate_size"]
    return cfg


def tiny_image_size(spec) -> int | None:
    """A preset that feeds its tower another size than the config's (DINOv2: 224 for 518) gets a
    tiny one smaller than the tiny config's too, so the position embeddings are interpolated."""
    if spec.vision.image_size is None:
        return None
    return VISION_SIZE["image_size"] - VISION_SIZE["patch_size"]


def tiny_spec(spec: ModelSpec, tokenizer_dir: str, vocab_size: int, special_ids: dict) -> ModelSpec:
    """The preset's ModelSpec with inline tiny configs of the same classes and its own
    feature layer, selection, preprocessing, connector and template."""
    llm = dataclasses.replace(
        spec.llm,
        name_or_path=None,
        tokenizer=str(tokenizer_dir),
        config=tiny_llm_config(arch_config(spec.llm, "llm"), vocab_size, special_ids),
    )
    if is_openclip(spec.vision):  # a registered tiny open_clip config of the same classes, random init
        from tiny_openclip import TINY_FOR

        real = spec.vision.name_or_path.split(":", 1)[1]
        vision = dataclasses.replace(spec.vision, name_or_path=f"open_clip:{TINY_FOR[real]}", pretrained=None)
    else:
        vision = dataclasses.replace(
            spec.vision,
            name_or_path=None,
            image_size=tiny_image_size(spec),
            config=tiny_vision_config(arch_config(spec.vision, "vision")),
        )
    return dataclasses.replace(spec, llm=llm, vision=vision)
