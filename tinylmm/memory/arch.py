"""A preset's model without weights: `models.assemble` on the `meta` device, from the
architecture configs embedded in tinylmm/assets/arch/ or shipped with open_clip."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from torch import nn

from tinylmm.models.arch import arch_config, arch_file, embedded_archs
from tinylmm.models.assemble import assemble
from tinylmm.models.llm import config_from_dict, from_config
from tinylmm.models.vision import backend_of
from tinylmm.schema import ModelSpec, VisionSpec, from_dict, to_dict

__all__ = [
    "MetaModel",
    "arch_config",
    "arch_file",
    "build_meta",
    "count_llm_parameters",
    "count_vision_parameters",
    "embedded_archs",
]


@dataclass
class MetaModel:
    """The model of a preset on the meta device (shapes only), as the planner reads it."""

    model: nn.Module  # the TinyLMM, on the meta device
    notes: list[str]

    @property
    def llm(self) -> nn.Module:
        return self.model.llm

    @property
    def vision(self) -> nn.Module:
        return self.model.vision

    @property
    def connector(self) -> nn.Module:
        return self.model.connector

    @property
    def llm_config(self):
        return self.model.llm.config

    @property
    def num_image_tokens(self) -> int:  # visual tokens per image in the LLM sequence
        return self.model.num_image_tokens

    @property
    def tower_tokens(self) -> int:  # tokens inside the tower per image (patches, + CLS / registers)
        return self.model.vision.tower_tokens

    @property
    def llm_attention(self) -> str:  # what the LLM runs without flash-attention: sdpa, or eager
        return self.model.llm.config._attn_implementation

    def component(self, name: str) -> nn.Module:
        return getattr(self.model, name)

    def layer_stack(self, component: str):
        return self.model.layer_stack(component)


@functools.lru_cache(maxsize=64)  # every shipped preset (tinylmm zoo show), and some more
def _build_meta(key: str) -> MetaModel:
    model = assemble(from_dict(ModelSpec, json.loads(key)), device="meta")
    notes = list(model.notes)
    if model.llm.config._attn_implementation != "sdpa":
        notes.insert(
            0,
            f"LLM model_type '{model.llm.config.model_type}' has no sdpa attention: planned with eager "
            "attention (flash_attention_2 on a GPU that has it)",
        )
    return MetaModel(model, notes)


def build_meta(spec: ModelSpec) -> MetaModel:
    """The preset's model on the meta device, cached by its spec."""
    return _build_meta(json.dumps(to_dict(spec), sort_keys=True))


def count_llm_parameters(data: dict) -> int:
    """Parameters of the causal LM that the config `data` describes."""
    model = from_config(config_from_dict(data), device="meta")
    return sum(p.numel() for p in model.parameters())


def count_vision_parameters(data: dict) -> int:
    """Parameters of the whole vision tower the config `data` describes (uncut: all layers,
    post-layernorm, SigLIP's head)."""
    spec = VisionSpec(config=data)
    return backend_of(spec).uncut_parameters(spec)
