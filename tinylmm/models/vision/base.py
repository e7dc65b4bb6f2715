"""The vision backend registry. `VisionSpec.backend` (tinylmm/schema.py) says which backend
builds a spec's tower: the prefix of `<backend>:<model>`, else `transformers`.

A backend provides:

    validate(spec)          config checks of its own, before anything is built
    build(spec, device=, dtype=, attn_implementation=)
                            the tower, cut at the feature layer: with its weights, or on the
                            `meta` device from its architecture config (no weights read)
    load(directory, spec)   the tower a checkpoint's vision/ directory records (random
                            weights: the caller restores model.safetensors)
    image_processor(spec, tower)   the preprocessing the tower expects
    uncut_parameters(spec)  the published tower's parameter count (every layer and head)
    requirement(spec)       (module, message) of an optional package it needs, or None

A tower provides `hidden_size`, `image_size`, `patch_size`, `num_patches` (tokens it hands
the connector), `tower_tokens` (tokens inside it), `layers`, `spec`, `config` (saved with
`config.save_pretrained(dir)`), and `trace(ctx)` for the memory planner.
"""

from __future__ import annotations

from tinylmm.registry import Registry
from tinylmm.schema import VisionSpec

VISION_BACKENDS: Registry = Registry("vision backend")


def backend_of(spec: VisionSpec):
    return VISION_BACKENDS.get(spec.backend, "model.vision.name_or_path")
