"""The language model: any `AutoModelForCausalLM` (llama, stablelm, phi, qwen2 ...)."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from tinylmm.errors import ConfigError
from tinylmm.models.loading import from_pretrained_or_fail
from tinylmm.schema import LLMSpec

# keys of a saved config.json that are no architecture setting
NOT_CONFIG = ("architectures", "transformers_version", "_name_or_path", "auto_map")

# transformers' model code is imported where a model is built, not with this module: config
# validation reaches it (through the vision backends) and must stay fast for the CLI.

log = logging.getLogger(__name__)


def supports_attention(config, implementation: str) -> bool:
    """Whether the causal LM class of `config` has this attention path (Gemma-2 has no sdpa:
    sdpa cannot soft-cap attention scores)."""
    from transformers import AutoModelForCausalLM

    model_cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    flag = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}.get(implementation)
    return model_cls is None or flag is None or bool(getattr(model_cls, flag, False))


def attention_for(config, requested: str) -> str:
    """`requested`, or eager where the model class lacks it; logged, and the run reports it."""
    if supports_attention(config, requested):
        return requested
    log.warning("%s has no %s attention: it runs eager attention", config.model_type, requested)
    return "eager"


def config_from_dict(data: dict):
    """A transformers config from an architecture mapping (an inline `model.llm.config`, an
    embedded or local config.json)."""
    data = {k: v for k, v in data.items() if k not in NOT_CONFIG}
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ConfigError("model.llm.config needs a 'model_type' (llama, stablelm, phi, qwen2 ...)")
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as e:
        raise ConfigError(f"model.llm.config: {e}") from None


def from_config(cfg, *, dtype=None, attn_implementation: str = "sdpa", device=None) -> nn.Module:
    """A causal LM of `cfg`, randomly initialised (on `device`: `meta` builds shapes only)."""
    from transformers import AutoModelForCausalLM

    with contextlib.nullcontext() if device is None else torch.device(device):  # None: the caller's device
        return AutoModelForCausalLM.from_config(
            cfg, dtype=dtype, attn_implementation=attention_for(cfg, attn_implementation)
        )


def build_llm(spec: LLMSpec, *, dtype=None, attn_implementation: str = "sdpa") -> nn.Module:
    if spec.config is not None:
        return from_config(config_from_dict(spec.config), dtype=dtype, attn_implementation=attn_implementation)
    if spec.name_or_path:
        from transformers import AutoConfig, AutoModelForCausalLM

        remote = {"trust_remote_code": spec.trust_remote_code}
        cfg = from_pretrained_or_fail(AutoConfig, spec.name_or_path, "language model", **remote)
        return from_pretrained_or_fail(
            AutoModelForCausalLM,
            spec.name_or_path,
            "language model",
            **remote,
            dtype=dtype,
            attn_implementation=attention_for(cfg, attn_implementation),
        )
    raise ConfigError("model.llm needs 'name_or_path' (hub id or directory) or an inline 'config'")


def build_tokenizer(spec: LLMSpec):
    source = spec.tokenizer or spec.name_or_path
    if source is None:
        raise ConfigError("model.llm.tokenizer is required when the LLM is built from an inline config")
    from transformers import AutoTokenizer

    return from_pretrained_or_fail(AutoTokenizer, source, "tokenizer", trust_remote_code=spec.trust_remote_code)


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM, for partial training."""
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm.model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"cannot find the decoder layers of {type(llm).__name__} for partial training")
    return layers
