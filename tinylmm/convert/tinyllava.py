"""TinyLLaVA_Factory checkpoints -> tinylmm models (`tinylmm convert --from tinyllava`).

A TinyLLaVA_Factory model directory (`TinyLlavaForConditionalGeneration.save_pretrained`,
e.g. tinyllava/TinyLLaVA-Phi-2-SigLIP-3.1B) holds

    config.json     model_type "tinyllava": text_config and vision_config (the LLM's and the
                    tower's configs; keys equal to the class defaults may be left out),
                    connector_type, vision_feature_layer, vision_feature_select_strategy,
                    image_aspect_ratio, and training-only keys (tune_type_*, tokenizer_* ...)
    model.safetensors, or shards + model.safetensors.index.json (pytorch_model*.bin in
                    older ones): language_model.* (the causal LM), vision_tower._vision_tower.*
                    (the whole CLIP/SigLIP vision model), connector._connector.* (an
                    nn.Sequential Linear-GELU-Linear, or one Linear)
    tokenizer files the LLM's tokenizer, as their training saved it

Where their conventions differ from ours, the import follows theirs:
- their `patch` selection drops token 0 even when it is a patch (SigLIP has no CLS): our
  `drop_first` (CLIP's token 0 is its CLS, our `patch`);
- the image preprocessing is the tower's processor (SigLIP: resize to a square; CLIP:
  shortest edge + centre crop), after LLaVA's pad-to-square when image_aspect_ratio is "pad";
- their prompt format is chosen when they run the model (--conv-mode), not saved: their
  formats share the text and differ in the answer's end token, which each of their training
  scripts pairs with the tokenizer's eos, so the eos picks ours (see `pick_template`);
- they splice the image features where a -200 placeholder sits in the ids; we expand the
  `<image>` token, added to the tokenizer, into the same positions. The LLM keeps its
  vocabulary (TinyLMM.embed never reads the `<image>` row), so no output changes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from tinylmm.data.processor import ImageProcessor, Processor, ensure_image_token
from tinylmm.data.templates import TEMPLATES
from tinylmm.errors import ConfigError
from tinylmm.files import write_atomically
from tinylmm.models.assemble import assemble
from tinylmm.models.loading import from_pretrained_or_fail, quiet_libraries
from tinylmm.models.vision.hf import FAMILY_MEAN_STD, VisionTower, classes
from tinylmm.schema import ConnectorSpec, LLMSpec, ModelSpec, VisionSpec

# TinyLlavaConfig's own keys (tinyllava/model/configuration_tinyllava.py) and the keys any
# saved transformers config may carry. Keys outside both are refused: we would not know
# what they change.
CONFIG_KEYS = {
    "llm_model_name_or_path",
    "tokenizer_name_or_path",
    "vision_model_name_or_path",
    "vision_model_name_or_path2",
    "connector_type",
    "text_config",
    "hidden_size",
    "vocab_size",
    "ignore_index",
    "image_token_index",
    "pad_token",
    "pad_token_id",
    "tokenizer_padding_side",
    "tokenizer_model_max_length",
    "vision_config",
    "vision_hidden_size",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "image_aspect_ratio",
    "resampler_hidden_size",
    "num_queries",
    "num_resampler_layers",
    "use_cache",
    "cache_dir",
    "tokenizer_use_fast",
    "tune_type_llm",
    "tune_type_connector",
    "tune_type_vision_tower",
    "tune_vision_tower_from_layer",
    "model_type",
    "architectures",
    "auto_map",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
}
CONNECTORS = {"mlp2x_gelu": "mlp.", "linear": "proj."}  # theirs -> ours, with our weight prefix
VISION_TYPES = ("siglip_vision_model", "clip_vision_model")
ASPECT_RATIOS = ("square", "pad")
SELECTS = ("patch", "cls_patch")
# Our templates with TinyLLaVA's text whose answers end with this eos (their phi and
# qwen2_base formats: <|endoftext|>; llama: </s>); any other eos: `tinyllava`.
TEMPLATE_BY_EOS = {"<|endoftext|>": "phi", "</s>": "llama"}
# Keys a saved transformers sub-config carries that do not describe the architecture
# (auto_map would ask for the hub's remote code; TinyLLaVA adds the tower's source paths).
CONFIG_NOISE = (
    "auto_map",
    "_name_or_path",
    "architectures",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "model_name_or_path",
    "model_name_or_path2",
)


class NotTinyLLaVAError(FileNotFoundError):
    pass


def is_tinyllava_dir(path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "tinyllava"
    except (ValueError, AttributeError):
        return False


def read_config(src: Path) -> dict:
    src = Path(src)
    config = src / "config.json"
    if not config.is_file():
        raise NotTinyLLaVAError(f"'{src}' is not a TinyLLaVA_Factory checkpoint: no config.json there")
    try:
        cfg = json.loads(config.read_text())
    except ValueError as e:
        raise ConfigError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "tinyllava":
        found = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise NotTinyLLaVAError(
            f"'{src}' is not a TinyLLaVA_Factory checkpoint: {config} has model_type {found!r}, expected 'tinyllava'"
        )
    unknown = sorted(set(cfg) - CONFIG_KEYS - set(PretrainedConfig().to_dict()))
    if unknown:
        raise ConfigError(
            f"{config}: unknown key(s) {', '.join(unknown)}: not keys of TinyLLaVA_Factory's "
            "TinyLlavaConfig, so tinylmm cannot tell what they change"
        )
    for key in ("text_config", "vision_config"):
        if not isinstance(cfg.get(key), dict):
            raise ConfigError(f"{config}: '{key}' is missing; the import builds the model from it")
    return cfg


def _choice(cfg: dict, key: str, allowed, default=None):
    value = cfg.get(key, default)
    if value not in allowed:
        raise ConfigError(
            f"config.json: {key}={value!r} is not supported by the import (supported: {', '.join(map(str, allowed))})"
        )
    return value


def _sub_config(cfg: dict, key: str) -> dict:
    return {k: v for k, v in cfg[key].items() if k not in CONFIG_NOISE}


def text_config(cfg: dict):
    """The LLM's transformers config. Their saved text_config leaves out keys equal to the
    class defaults, and they rebuild it with `from_dict` on the LLM's config class: the
    class's defaults fill the gaps, as they do here."""
    sub = _sub_config(cfg, "text_config")
    model_type = sub.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **sub)
    except (ValueError, KeyError):
        raise ConfigError(
            f"config.json: text_config.model_type={model_type!r} is not an LLM transformers knows "
            "(models that need the hub's remote code, such as OpenELM, are not supported)"
        ) from None


def vision_model(cfg: dict, dtype, attn_implementation: str):
    sub = _sub_config(cfg, "vision_config")
    model_type = sub.pop("model_type", None)
    if model_type not in VISION_TYPES:
        raise ConfigError(
            f"config.json: vision_config.model_type={model_type!r} is not supported by the "
            f"import (supported: {', '.join(VISION_TYPES)})"
        )
    config_cls, model_cls = classes()[model_type]
    config = config_cls(**sub)
    config._attn_implementation = attn_implementation
    return model_cls(config).to(dtype)


def pick_template(tokenizer, override: str | None = None) -> str:
    if override is not None:
        TEMPLATES.get(override, "--template")
        return override
    if tokenizer.eos_token is None:
        raise ConfigError(
            "the tokenizer has no eos token, which picks the conversation format; give the template (--template)"
        )
    return TEMPLATE_BY_EOS.get(tokenizer.eos_token, "tinyllava")


# --------------------------------------------------------------------------- weights


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    """Their weights, whichever way transformers saved them (one file or shards)."""
    src = Path(src)
    for index, single, load in (
        ("model.safetensors.index.json", "model.safetensors", lambda f: load_file(str(f))),
        (
            "pytorch_model.bin.index.json",
            "pytorch_model.bin",
            lambda f: torch.load(f, map_location="cpu", weights_only=True),
        ),
    ):
        if (src / index).is_file():
            shards = sorted(set(json.loads((src / index).read_text())["weight_map"].values()))
            missing = [s for s in shards if not (src / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{src / index} lists shard(s) that are missing: {', '.join(missing)}")
            state = {}
            for shard in shards:
                state.update(load(src / shard))
            return state
        if (src / single).is_file():
            return load(src / single)
    hint = (
        " It has an adapter_config.json: a LoRA run of TinyLLaVA_Factory; merge it with their tooling first."
        if (src / "adapter_config.json").exists()
        else ""
    )
    raise FileNotFoundError(
        f"no weights in '{src}': looked for model.safetensors(.index.json) and pytorch_model.bin(.index.json).{hint}"
    )


PREFIXES = {"language_model.": "llm", "vision_tower._vision_tower.": "vision", "connector._connector.": "connector"}


def split_weights(state: dict, src: Path) -> dict[str, dict]:
    parts: dict[str, dict] = {name: {} for name in PREFIXES.values()}
    for key, value in state.items():
        for prefix, part in PREFIXES.items():
            if key.startswith(prefix):
                parts[part][key[len(prefix) :]] = value
                break
        else:
            raise ConfigError(
                f"{src}: weight '{key}' belongs to none of language_model, vision_tower._vision_tower, "
                "connector._connector"
            )
    for part, weights in parts.items():
        if not weights:
            raise ConfigError(f"{src}: no {part} weights in the checkpoint")
    return parts


def _load_llm(llm, weights: dict, src: Path) -> None:
    missing, unexpected = llm.load_state_dict(weights, strict=False)
    tied = getattr(llm.config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(
            f"{src}: the language_model.* weights do not match the text_config's "
            f"{type(llm).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    llm.tie_weights()


def _load_vision(tower, weights: dict, src: Path) -> None:
    """Their tower is whole; ours is cut after the feature layer (see models/vision/hf.py)."""
    ours = tower.model.state_dict()
    if not any(k.startswith("vision_model.") for k in ours):  # transformers 5 dropped that level
        weights = {k.removeprefix("vision_model."): v for k, v in weights.items()}
    kept = len(tower.layers)

    def dropped(key: str) -> bool:  # parts the cut removed, and buffers older versions saved
        layer = re.search(r"encoder\.layers\.(\d+)\.", key)
        return bool(
            (layer and int(layer.group(1)) >= kept)
            or re.match(r"(post_layernorm|head)\.", key)
            or key.endswith("position_ids")
        )

    unexpected = [k for k in weights if k not in ours and not dropped(k)]
    missing = [k for k in ours if k not in weights]
    if missing or unexpected:
        raise ConfigError(
            f"{src}: the vision_tower._vision_tower.* weights do not match the vision_config's "
            f"{type(tower.model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    tower.model.load_state_dict({k: v for k, v in weights.items() if k in ours})


def _load_connector(connector, weights: dict, prefix: str, src: Path) -> None:
    ours = {prefix + k: v for k, v in weights.items()}
    try:
        connector.load_state_dict(ours)
    except RuntimeError as e:
        raise ConfigError(
            f"{src}: the connector._connector.* weights do not match the connector: {str(e).splitlines()[0]}"
        ) from None


# --------------------------------------------------------------------------- build


def build(
    src,
    *,
    tokenizer: str | Path | None = None,
    template: str | None = None,
    dtype=None,
    attn_implementation: str = "sdpa",
):
    """A TinyLLaVA_Factory directory -> (TinyLMM, Processor, notes). `dtype` default: the
    dtype their weights are stored in. `tokenizer`: where the tokenizer is (default: `src`).
    `notes` are human-readable remarks on choices the import made."""
    quiet_libraries()
    src = Path(src)
    cfg = read_config(src)
    notes = []
    connector_type = _choice(cfg, "connector_type", CONNECTORS)
    select = _choice(cfg, "vision_feature_select_strategy", SELECTS, "patch")
    aspect = _choice(cfg, "image_aspect_ratio", ASPECT_RATIOS + (None,), "square") or "square"
    if cfg.get("vision_model_name_or_path2"):
        raise ConfigError(
            f"config.json: vision_model_name_or_path2={cfg['vision_model_name_or_path2']!r}: "
            "two vision towers (TinyLLaVA's MoF) are not supported by the import"
        )
    layer = cfg.get("vision_feature_layer", -2)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"config.json: vision_feature_layer={layer!r} is not a layer index")

    tok_source = Path(tokenizer) if tokenizer is not None else src
    try:
        tok = from_pretrained_or_fail(AutoTokenizer, str(tok_source), "tokenizer")
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"no usable tokenizer in '{tok_source}' ({type(e).__name__}): TinyLLaVA_Factory read it from "
            f"tokenizer_name_or_path={cfg.get('tokenizer_name_or_path') or cfg.get('llm_model_name_or_path')!r}; "
            "download that tokenizer and pass its directory with --tokenizer"
        ) from None
    ensure_image_token(tok)
    template = pick_template(tok, template)

    parts = split_weights(read_weights(src), src)
    stored = parts["llm"].get("model.embed_tokens.weight", next(iter(parts["llm"].values()))).dtype
    dtype = dtype or stored
    llm = AutoModelForCausalLM.from_config(text_config(cfg), dtype=dtype, attn_implementation=attn_implementation)
    _load_llm(llm, parts["llm"], src)

    vmodel = vision_model(cfg, dtype, attn_implementation)
    has_cls = hasattr(getattr(vmodel, "vision_model", vmodel).embeddings, "class_embedding")
    if select == "patch":
        select = "patch" if has_cls else "drop_first"
    family = vmodel.config.model_type
    mean, std = _image_mean_std(src, family, FAMILY_MEAN_STD[family], notes)
    vspec = VisionSpec(
        name_or_path=cfg.get("vision_model_name_or_path") or None,
        feature_layer=layer,
        select=select,
        pad_to_square=aspect == "pad",
        image_mean=mean,
        image_std=std,
    )
    try:
        tower = VisionTower(vmodel, vspec)
    except ConfigError:
        raise ConfigError(
            f"config.json: vision_feature_layer={layer} is outside the vision tower's "
            f"{vmodel.config.num_hidden_layers} layers"
        ) from None
    _load_vision(tower, parts["vision"], src)

    spec = ModelSpec(
        llm=LLMSpec(name_or_path=cfg.get("llm_model_name_or_path") or None),
        vision=vspec,
        connector=ConnectorSpec(type=connector_type),
        template=template,
    )
    model = assemble(spec, tokenizer=tok, llm=llm, tower=tower).eval()
    _load_connector(model.connector.to(dtype), parts["connector"], CONNECTORS[connector_type], src)
    image_processor = ImageProcessor(
        size=tower.image_size,
        image_mean=mean,
        image_std=std,
        pad_to_square=vspec.pad_to_square,
        resize="shortest_floor" if family == "clip_vision_model" and not vspec.pad_to_square else "squash",
    )
    notes.append(f"template '{template}' (the tokenizer's eos is {tok.eos_token!r})")
    theirs = cfg.get("vision_feature_select_strategy", "patch")
    notes.append(f"{model.num_image_tokens} visual tokens per image (their '{theirs}' selection: ours '{select}')")
    return model, Processor(tok, image_processor, template, model.num_image_tokens), notes


def _image_mean_std(src: Path, family: str, default, notes: list) -> tuple[list, list]:
    """Their image processor comes from the tower's hub directory, which released
    checkpoints do not ship; a preprocessor_config.json beside the weights wins."""
    pre = src / "preprocessor_config.json"
    if pre.is_file():
        data = json.loads(pre.read_text())
        if "image_mean" in data and "image_std" in data:
            notes.append(f"image mean/std from {pre.name}")
            return list(data["image_mean"]), list(data["image_std"])
    notes.append(f"image mean/std: the {family.split('_')[0].upper()} family's {default[0]} / {default[1]}")
    return list(default[0]), list(default[1])


def convert(src, out, *, tokenizer=None, template: str | None = None) -> tuple[Path, list[str]]:
    """Write the TinyLLaVA_Factory checkpoint `src` as a tinylmm checkpoint at `out` (which
    must not exist). Returns (out, notes)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"'{out}' already exists; not overwriting it")
    model, processor, notes = build(src, tokenizer=tokenizer, template=template)
    write_atomically(out, lambda d: model.save(d, processor))
    return out, notes


def load(src, *, attn_implementation: str = "sdpa", dtype=None, device=None, load_4bit: bool = False):
    """`tinylmm.load` on a TinyLLaVA_Factory directory: converted in memory. The same model
    as loading its converted checkpoint: the LLM in its stored dtype, the vision tower and
    connector in float32, unless `dtype` is given."""
    if load_4bit:
        raise ConfigError(
            f"'{src}' is a TinyLLaVA_Factory checkpoint: convert it first (tinylmm convert "
            "--from tinyllava DIR OUT), then load OUT in 4-bit"
        )
    model, processor, _ = build(src, dtype=dtype, attn_implementation=attn_implementation)
    if dtype is None:
        model.vision.float()
        model.connector.float()
    if device is not None:
        model.to(device)
    return model, processor
