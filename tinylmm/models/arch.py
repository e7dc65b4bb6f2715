"""Architectures without weights: hub configs embedded in tinylmm/assets/arch/, so that every
preset builds on the `meta` device offline (parameter counts, the memory planner), and the
tokenizer sizes of the zoo's hub LLMs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tinylmm.data.processor import ensure_image_token
from tinylmm.errors import ConfigError
from tinylmm.models.llm import build_tokenizer, config_from_dict, from_config, supports_attention
from tinylmm.models.loading import resolve_location
from tinylmm.resources import asset
from tinylmm.schema import LLMSpec, VisionSpec

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


def arch_file(name: str) -> Path:
    """tinylmm/assets/arch/<owner>--<name>.json: an embedded config.json of a hub model."""
    return asset("arch") / (name.replace("/", "--") + ".json")


def embedded_archs() -> list[str]:
    return sorted(p.stem.replace("--", "/") for p in asset("arch").glob("*.json"))


def vision_part(data: dict) -> dict:
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
    if spec.config is not None:
        return dict(spec.config)
    name = spec.name_or_path
    if not name:
        raise ConfigError(f"model.{what} needs 'name_or_path' (hub id or directory) or an inline 'config'")
    if what == "vision" and spec.backend != "transformers":
        raise ConfigError(
            f"model.{what} '{name}' is a {spec.backend} tower: its architecture is that "
            "backend's own model config, not a transformers config"
        )
    path = arch_file(name)
    if not path.exists():
        path = Path(resolve_location(name)).expanduser() / "config.json"
    if not path.exists():
        raise ConfigError(
            f"no architecture config for the {what} '{name}': it is not embedded in tinylmm "
            f"({', '.join(embedded_archs())}) and is not a local directory with a config.json.\n"
            f"  Fix: download its config (huggingface-cli download {name} config.json --local-dir DIR) and "
            f"use model.{what}.name_or_path=DIR, or add it as tinylmm/assets/arch/{arch_file(name).name}"
        )
    data = json.loads(path.read_text())
    return vision_part(data) if what == "vision" else data


def tokenizer_len(spec: LLMSpec) -> tuple[int | None, str]:
    """len(tokenizer) after `<image>` is added, and where that number comes from."""
    source = spec.tokenizer or spec.name_or_path
    if source is None:
        return None, "no tokenizer"
    if source.startswith("builtin:") or Path(source).expanduser().is_dir():
        tok = build_tokenizer(dataclasses.replace(spec, tokenizer=source))
        ensure_image_token(tok)
        return len(tok), f"tokenizer {source}"
    if source in TOKENIZER_LEN:
        return TOKENIZER_LEN[source] + 1, f"known tokenizer size of {source}"
    return None, f"tokenizer of {source} not known offline (assumed to fit the embedding)"


def meta_llm(spec: LLMSpec):
    """The LLM of `spec` on the meta device, from its architecture config (no weights), with
    the attention it runs without flash-attention: sdpa, or eager where its class has no sdpa
    path (Gemma-2: sdpa cannot soft-cap the scores)."""
    cfg = config_from_dict(arch_config(spec, "llm"))
    attention = "sdpa" if supports_attention(cfg, "sdpa") else "eager"
    return from_config(cfg, attn_implementation=attention, device="meta")
