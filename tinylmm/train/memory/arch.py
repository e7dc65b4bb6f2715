"""The architectures, without weights: embedded hub configs, built on the `meta` device.

`build_meta(spec)` builds a preset's model as tinylmm does (transformers' classes or an
open_clip tower, the vision tower cut at its feature layer, the connector, the embedding
grown for `<image>`) with shapes only: no memory, no download.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tinylmm.config import ConfigError, LLMSpec, ModelSpec, VisionSpec, to_dict
from tinylmm.resources import asset

# len(tokenizer) of the zoo's hub LLMs, before `<image>` is added. The embedding grows only
# when the tokenizer outgrows it. Local tokenizers are loaded and measured instead.
# Sources of the newer ones: each hub repo's tokenizer (tokenizer_config.json's
# added_tokens_decoder ends at id N-1, and the vocabulary below it is contiguous).
TOKENIZER_LEN = {
    "microsoft/phi-2": 50295,
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 32000,
    "stabilityai/stablelm-2-zephyr-1_6b": 100289,
    "stabilityai/stablelm-2-1_6b": 100289,
    # Qwen2.5: 151,643 BPE tokens + 22 specials up to <|file_sep|> (151664)
    "Qwen/Qwen2.5-0.5B-Instruct": 151665,
    "Qwen/Qwen2.5-1.5B-Instruct": 151665,
    "Qwen/Qwen2.5-3B-Instruct": 151665,
    # Qwen3: Qwen2.5's + <tool_response>, </tool_response>, <think>, </think> (up to 151668)
    "Qwen/Qwen3-0.6B": 151669,
    "Qwen/Qwen3-1.7B": 151669,
    "Qwen/Qwen3-4B": 151669,
    # SmolLM2: 49,152 tokens, its specials (<|im_start|> ...) inside the vocabulary
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": 49152,
    # Llama 3: 128,000 BPE tokens + 256 special / reserved tokens
    "meta-llama/Llama-3.2-1B-Instruct": 128256,
    "meta-llama/Llama-3.2-3B-Instruct": 128256,
    # Gemma: a 256,000-entry SentencePiece vocabulary (specials and <unusedN> inside)
    "google/gemma-2-2b-it": 256000,
}

_NOT_CONFIG = ("architectures", "transformers_version", "_name_or_path", "auto_map")


def arch_file(name: str) -> Path:
    """tinylmm/assets/arch/<owner>--<name>.json: an embedded config.json of a hub model."""
    return asset("arch") / (name.replace("/", "--") + ".json")


def embedded_archs() -> list[str]:
    return sorted(p.stem.replace("--", "/") for p in asset("arch").glob("*.json"))


def _vision_part(data: dict) -> dict:
    """A full CLIP/SigLIP config holds both towers; the vision tower is its vision_config
    (a DINOv2 config is the tower's own)."""
    if "vision_config" in data:
        part = dict(data["vision_config"])
        part.setdefault("model_type", f"{data.get('model_type', '')}_vision_model")
        return part
    return dict(data)


def arch_config(spec: LLMSpec | VisionSpec, what: str) -> dict:
    """The architecture config of a preset part ("llm" or "vision"): the inline `config`,
    else the embedded copy for `name_or_path`, else `name_or_path/config.json` of a local
    directory."""
    from tinylmm.models.openclip import is_openclip

    if spec.config is not None:
        return dict(spec.config)
    name = spec.name_or_path
    if not name:
        raise ConfigError(f"model.{what} needs 'name_or_path' (hub id or directory) or an inline 'config'")
    if what == "vision" and is_openclip(spec):
        raise ConfigError(f"model.{what} '{name}' is an open_clip tower: its architecture is open_clip's model "
                          "config, not a transformers config (build_meta builds it)")
    path = arch_file(name)
    if not path.exists():
        path = Path(name).expanduser() / "config.json"
    if not path.exists():
        raise ConfigError(
            f"no architecture config for the {what} '{name}': it is not embedded in tinylmm "
            f"({', '.join(embedded_archs())}) and is not a local directory with a config.json.\n"
            f"  Fix: download its config (huggingface-cli download {name} config.json --local-dir DIR) and "
            f"use model.{what}.name_or_path=DIR, or add it as tinylmm/assets/arch/{arch_file(name).name}"
        )
    data = json.loads(path.read_text())
    return _vision_part(data) if what == "vision" else data


def _llm_config(data: dict):
    from transformers import AutoConfig

    data = {k: v for k, v in data.items() if k not in _NOT_CONFIG}
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ConfigError("model.llm.config needs a 'model_type' (llama, stablelm, phi, qwen2 ...)")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as e:
        raise ConfigError(f"model.llm.config: {e}") from None


def _vision_config(data: dict):
    """(config, model class) of a vision tower config, as tinylmm builds it (sdpa)."""
    from tinylmm.models.vision import _config_from_dict, _vision_classes

    cfg = _config_from_dict({k: v for k, v in data.items() if k not in _NOT_CONFIG})
    cfg._attn_implementation = "sdpa"
    return cfg, _vision_classes()[cfg.model_type][1]


def llm_attention(config) -> str:
    """The attention a causal LM of `config` runs: sdpa, or eager where its class has no
    sdpa path (Gemma-2: sdpa cannot soft-cap the scores)."""
    from tinylmm.models.llm import supports_attention

    return "sdpa" if supports_attention(config, "sdpa") else "eager"


def count_llm_parameters(data: dict) -> int:
    """Parameters of the causal LM that the config `data` describes."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_llm_config(data))
    return sum(p.numel() for p in model.parameters())


def count_vision_parameters(data: dict) -> int:
    """Parameters of the whole vision tower (uncut: all layers, post-layernorm, SigLIP's head)."""
    cfg, model_cls = _vision_config(_vision_part(data))
    with torch.device("meta"):
        model = model_cls(cfg)
    return sum(p.numel() for p in model.parameters())


def _tokenizer_len(spec: LLMSpec) -> tuple[int | None, str]:
    """len(tokenizer) after `<image>` is added, and where that number comes from."""
    source = spec.tokenizer or spec.name_or_path
    if source is None:
        return None, "no tokenizer"
    if source.startswith("builtin:") or Path(source).expanduser().is_dir():
        from tinylmm.models.llm import build_tokenizer
        from tinylmm.processor import ensure_image_token

        tok = build_tokenizer(dataclasses.replace(spec, tokenizer=source))
        ensure_image_token(tok)
        return len(tok), f"tokenizer {source}"
    if source in TOKENIZER_LEN:
        return TOKENIZER_LEN[source] + 1, f"known tokenizer size of {source}"
    return None, f"tokenizer of {source} not known offline (assumed to fit the embedding)"


@dataclass
class MetaModel:
    """The model of a preset on the meta device (shapes only)."""

    llm: nn.Module
    vision: nn.Module  # tinylmm VisionTower or OpenCLIPTower, cut at the feature layer
    connector: nn.Module
    llm_config: object
    vision_config: object
    num_image_tokens: int  # visual tokens per image in the LLM sequence
    tower_tokens: int  # tokens inside the tower per image (patches, + CLS / registers)
    notes: list[str]
    llm_attention: str = "sdpa"  # what the LLM runs without flash-attention: sdpa, or eager

    def component(self, name: str) -> nn.Module:
        return getattr(self, name)



@functools.lru_cache(maxsize=64)  # every shipped preset (tinylmm zoo ls), and some more
def _build_meta(key: str) -> MetaModel:
    from transformers import AutoModelForCausalLM

    from tinylmm.config import from_dict
    from tinylmm.models.connectors import build_connector
    from tinylmm.models.openclip import build_openclip, is_openclip
    from tinylmm.models.vision import VisionTower

    spec = from_dict(ModelSpec, json.loads(key))
    notes = []
    llm_cfg = _llm_config(arch_config(spec.llm, "llm"))
    attn = llm_attention(llm_cfg)
    if attn != "sdpa":
        notes.append(f"LLM model_type '{llm_cfg.model_type}' has no sdpa attention: planned with eager attention "
                     "(flash_attention_2 on a GPU that has it)")
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llm_cfg, attn_implementation=attn)
    n_tok, source = _tokenizer_len(spec.llm)
    rows = llm.get_input_embeddings().num_embeddings
    if n_tok is None:
        notes.append(source)
    elif n_tok > rows:
        llm.resize_token_embeddings(n_tok, mean_resizing=False)
        notes.append(f"embedding grown {rows:,} -> {n_tok:,} rows for <image> ({source})")
    if is_openclip(spec.vision):  # open_clip ships its model configs: nothing to embed
        tower = build_openclip(spec.vision, device="meta")
        tower_tokens = tower.tower_tokens
    else:
        vis_cfg, model_cls = _vision_config(arch_config(spec.vision, "vision"))
        with torch.device("meta"):
            tower_model = model_cls(vis_cfg)
        tower = VisionTower(tower_model, spec.vision)
        grid = tower.image_size // tower.config.patch_size  # DINOv2: model.vision.image_size, if given
        tower_tokens = grid * grid + int(tower.has_cls)
    with torch.device("meta"):
        connector = build_connector(spec.connector, tower.hidden_size, llm.config.hidden_size)
    return MetaModel(llm, tower, connector, llm.config, tower.config,
                     connector.output_len(tower.num_patches), tower_tokens, notes, attn)


def build_meta(spec: ModelSpec) -> MetaModel:
    """The preset's model on the meta device, cached by its spec."""
    return _build_meta(json.dumps(to_dict(spec), sort_keys=True))
