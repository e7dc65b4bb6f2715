"""tinylmm models -> TinyLLaVA_Factory's own layout (`tinylmm export --to tinyllava OUT`), so
their eval scripts can score a model trained here. The inverse of tinylmm/convert/tinyllava.py
(whose docstring describes the layout): `tinylmm convert --from tinyllava OUT` gives the model
back.

How their loader reads it (tinyllava/model/, as stored): TinyLlavaConfig rebuilds
text_config and vision_config with `AutoConfig.from_pretrained(llm_model_name_or_path)` /
`(vision_model_name_or_path)` and then `.from_dict(...)` of the saved ones; the model classes
come from factories that match names inside those paths (`LLMFactory`: `if name in
model_name_or_path.lower()` over its registry gemma, openelm, phi, qwen, qwen2, stablelm,
tinyllama; the vision tower's: clip, siglip, dinov2); the tokenizer is read from
tokenizer_name_or_path and the image processor from the tower's path. So the export writes
the hub ids the model was built from, and refuses a model whose ids their factories would
not recognise. The tokenizer is saved beside the weights as well (the one tinylmm trained
with, `<image>` included), for `tinylmm convert`.

Their conventions (the import's, reversed): `patch` drops token 0 (our `patch` on CLIP and
`drop_first`), `cls_patch` keeps all (our `patch` on SigLIP); `image_aspect_ratio` "pad" is
LLaVA's pad-to-square; their image processor is the tower's (SigLIP: resize to a square, CLIP:
shortest edge + centre crop, offsets floored); their prompt format is chosen with --conv-mode
at eval time, and `tinylmm convert` picks ours back by the tokenizer's eos.

Refused, because their framework would run another model: a connector other than mlp2x_gelu
or linear; an open_clip or DINOv2 tower; an LLM their factory maps to another class (Qwen3,
Llama-3.2, SmolLM2, Gemma-2: see LLM_KEYS); a template that is not one of their USER/ASSISTANT
formats (the tokenizer's own chat template, `auto`, or one `convert` would not pick back); an
image preprocessing their tower's processor does not do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tinylmm.convert.hf_llava import ExportError
from tinylmm.convert.tinyllava import pick_template
from tinylmm.data.tokenizer_files import save_tokenizer

# their LLMFactory key for our LLM's model_type (the class it gives is that model_type's)
LLM_KEYS = {"phi": "phi", "stablelm": "stablelm", "llama": "tinyllama", "qwen2": "qwen2"}
VISION_KEYS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
CONNECTOR_PREFIXES = {"mlp2x_gelu": "mlp.", "linear": "proj."}  # ours; theirs have none
TEMPLATES = ("phi", "llama", "tinyllava")
IMAGE_TOKEN_INDEX = -200  # their placeholder in the ids (tinyllava/utils/constants.py)


def _named(name, key: str, what: str) -> str:
    if not name or key not in str(name).lower() or str(name).startswith("builtin:"):
        raise ExportError(
            f"the {what} was built from {name or 'an inline config'}: TinyLLaVA_Factory rebuilds its config with "
            f"AutoConfig.from_pretrained of the saved name and picks its class by the word '{key}' in it, so "
            "export a model built from the hub id (e.g. a zoo preset's)"
        )
    return str(name)


def check(model, processor) -> tuple[str, str]:
    """(llm name, vision name) to write; ExportError for what their framework cannot run."""
    spec = model.spec
    if spec.connector.type not in CONNECTOR_PREFIXES:
        raise ExportError(
            f"connector '{spec.connector.type}' is not one TinyLLaVA_Factory builds the same way "
            f"(exported: {', '.join(CONNECTOR_PREFIXES)})"
        )
    if spec.vision.backend != "transformers" or model.vision.config.model_type not in VISION_KEYS:
        raise ExportError(
            f"the vision tower ({spec.vision.name_or_path}) is not a transformers CLIP or SigLIP model: "
            "TinyLLaVA_Factory's towers are (open_clip and DINOv2 are not exported)"
        )
    llm_type = model.llm.config.model_type
    if llm_type not in LLM_KEYS:
        raise ExportError(
            f"the LLM is a {llm_type} model: TinyLLaVA_Factory's LLMFactory has no class for it (it maps "
            f"{', '.join(LLM_KEYS.values())}; a name it does not know fails, and Qwen3 or Gemma-2 names would "
            "get the Qwen2 or Gemma class)"
        )
    name = processor.template_name
    if name not in TEMPLATES:
        raise ExportError(
            f"template '{name}' is not one of TinyLLaVA_Factory's USER/ASSISTANT formats ({', '.join(TEMPLATES)}): "
            "their eval scripts could not prompt the model as it was trained"
        )
    if pick_template(processor.tokenizer) != name:
        raise ExportError(
            f"template '{name}' with the tokenizer's eos {processor.tokenizer.eos_token!r}: their formats pair the "
            f"answer's end with the eos, which picks '{pick_template(processor.tokenizer)}'"
        )
    ip, family = processor.image_processor, model.vision.config.model_type
    theirs = "squash" if family == "siglip_vision_model" else "shortest_floor"
    if not ip.pad_to_square and ip.resize != theirs:
        raise ExportError(
            f"the image processor resizes '{ip.resize}'; TinyLLaVA_Factory's {VISION_KEYS[family]} processor does "
            f"'{theirs}' (or set model.vision.pad_to_square: their 'pad' aspect mode)"
        )
    llm_name = _named(spec.llm.name_or_path, LLM_KEYS[llm_type], "LLM")
    vision_name = _named(spec.vision.name_or_path, VISION_KEYS[family], "vision tower")
    return llm_name, vision_name


def weights(model) -> dict[str, torch.Tensor]:
    out = {}
    tied = bool(getattr(model.llm.config, "tie_word_embeddings", False))
    for key, value in model.llm.state_dict().items():
        if not (tied and key == "lm_head.weight"):  # stored once, as transformers saves a tied head
            out["language_model." + key] = value
    for key, value in model.vision.model.state_dict().items():
        if not key.endswith("position_ids"):
            out["vision_tower._vision_tower.vision_model." + key.removeprefix("vision_model.")] = value
    width = model.vision.hidden_size  # cut by tinylmm, never used for the features; their tower has one
    out["vision_tower._vision_tower.vision_model.post_layernorm.weight"] = torch.ones(width)
    out["vision_tower._vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(width)
    prefix = CONNECTOR_PREFIXES[model.spec.connector.type]
    for key, value in model.connector.state_dict().items():
        out["connector._connector." + key.removeprefix(prefix)] = value
    dtype = model.llm.get_input_embeddings().weight.dtype
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in out.items()}


def config(model, processor, llm_name: str, vision_name: str) -> dict:
    drop_first = model.vision.drop_first
    text = {k: v for k, v in model.llm.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    vision = {
        k: v for k, v in model.vision.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")
    }
    tok = processor.tokenizer
    return {
        "architectures": ["TinyLlavaForConditionalGeneration"],
        "model_type": "tinyllava",
        "llm_model_name_or_path": llm_name,
        "tokenizer_name_or_path": llm_name,
        "vision_model_name_or_path": vision_name,
        "vision_model_name_or_path2": "",
        "connector_type": model.spec.connector.type,
        "text_config": text,
        "vision_config": vision,
        "hidden_size": model.llm.config.hidden_size,
        "vocab_size": model.llm.get_input_embeddings().num_embeddings,
        "vision_hidden_size": model.vision.hidden_size,
        "ignore_index": -100,
        "image_token_index": IMAGE_TOKEN_INDEX,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": getattr(model.llm.config, "max_position_embeddings", 2048),
        "tokenizer_use_fast": False,
        "vision_feature_layer": -1,  # the tower is saved cut after its feature layer
        "vision_feature_select_strategy": "patch" if drop_first else "cls_patch",
        "image_aspect_ratio": "pad" if processor.image_processor.pad_to_square else "square",
        "use_cache": False,
        "dtype": str(model.llm.get_input_embeddings().weight.dtype).removeprefix("torch."),
    }


def export(model, processor, out) -> list[str]:
    """Write `model` (a TinyLMM without adapters) as a TinyLLaVA_Factory model directory at
    `out` (created). Returns notes for the user."""
    llm_name, vision_name = check(model, processor)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config(model, processor, llm_name, vision_name), indent=2) + "\n")
    save_tokenizer(processor.tokenizer, out)  # reloads to the same ids (data/tokenizer_files.py)
    ip = processor.image_processor
    # their processor comes from the tower's hub id; this one is what `tinylmm convert` reads back
    (out / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": list(ip.image_mean), "image_std": list(ip.image_std)}, indent=2) + "\n"
    )
    conv_mode = {"phi": "phi", "llama": "llama", "tinyllava": "qwen2_instruct or gemma"}[processor.template_name]
    return [
        f"LLM {llm_name}, vision tower {vision_name}: TinyLLaVA_Factory reads their configs and processors from there",
        f"template '{processor.template_name}': their --conv-mode {conv_mode}",
    ]
