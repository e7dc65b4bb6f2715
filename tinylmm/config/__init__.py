"""A run's configuration: resolved from preset + recipe + overrides + `--tune` (resolve.py,
registry-free), validated against the registries and the trainability rules (validate.py),
saved with the layer that set each value (saving.py). The schema itself is tinylmm.schema.

    from tinylmm.config import resolve
    cfg, sources = resolve("tinyllava-phi2-siglip-3.1b", "share", ["stages.finetune.lr=1e-4"], tune="qlora")
"""

from __future__ import annotations

from tinylmm.config.layers import Layers, parse_override
from tinylmm.config.resolve import TUNE_CHOICES, TUNE_SWITCHES, apply_tune_switch, from_saved, layer_config
from tinylmm.config.saving import dump_resolved, load_resolved
from tinylmm.config.validate import validate
from tinylmm.errors import ConfigError, did_you_mean, unknown
from tinylmm.schema import (
    COMPONENTS,
    ConnectorSpec,
    DataSpec,
    EvalConfig,
    LLMSpec,
    LoraSpec,
    ModelSpec,
    QuantSpec,
    RunConfig,
    ShapesConfig,
    StageConfig,
    TrainConfig,
    VisionSpec,
    from_dict,
    to_dict,
)


def resolve(
    preset: str = "toy",
    recipe: str = "share",
    overrides=(),
    *,
    output_dir: str | None = None,
    tune: str | None = None,
    llm: str | None = None,
    vision: str | None = None,
):
    """The run config of preset + recipe + overrides (+ `--tune`), validated. Returns
    (config, sources): `sources` names the layer that set each dotted key."""
    cfg, sources = layer_config(
        preset, recipe, list(overrides), output_dir=output_dir, tune=tune, llm=llm, vision=vision
    )
    validate(cfg)
    return cfg, sources


__all__ = [
    "COMPONENTS",
    "TUNE_CHOICES",
    "TUNE_SWITCHES",
    "ConfigError",
    "ConnectorSpec",
    "DataSpec",
    "EvalConfig",
    "LLMSpec",
    "Layers",
    "LoraSpec",
    "ModelSpec",
    "QuantSpec",
    "RunConfig",
    "ShapesConfig",
    "StageConfig",
    "TrainConfig",
    "VisionSpec",
    "apply_tune_switch",
    "did_you_mean",
    "dump_resolved",
    "from_dict",
    "from_saved",
    "layer_config",
    "load_resolved",
    "parse_override",
    "resolve",
    "to_dict",
    "unknown",
    "validate",
]
