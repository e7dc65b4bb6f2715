"""The language model: any `AutoModelForCausalLM` (llama, stablelm, phi, qwen2 ...)."""

from __future__ import annotations

from torch import nn

from tinylmm.config import ConfigError, LLMSpec
from tinylmm.models.loading import from_pretrained_or_fail
from tinylmm.resources import asset


def build_llm(spec: LLMSpec, *, dtype=None, attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.config is not None:
        config = dict(spec.config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model.llm.config needs a 'model_type' (llama, stablelm, phi, qwen2 ...)")
        try:
            cfg = AutoConfig.for_model(model_type, **config)
        except ValueError as e:
            raise ConfigError(f"model.llm.config: {e}") from None
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    if spec.name_or_path:
        return from_pretrained_or_fail(
            AutoModelForCausalLM, spec.name_or_path, "language model", dtype=dtype,
            attn_implementation=attn_implementation,
        )
    raise ConfigError("model.llm needs 'name_or_path' (hub id or directory) or an inline 'config'")


def build_tokenizer(spec: LLMSpec):
    from transformers import AutoTokenizer

    source = spec.tokenizer or spec.name_or_path
    if source is None:
        raise ConfigError("model.llm.tokenizer is required when the LLM is built from an inline config")
    if source.startswith("builtin:"):
        path = asset(source.split(":", 1)[1] + "-tokenizer")
        if not path.exists():
            raise ConfigError(f"model.llm.tokenizer: no built-in tokenizer '{source}'")
        source = str(path)
    return from_pretrained_or_fail(AutoTokenizer, source, "tokenizer")


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM, for partial training."""
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm.model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"cannot find the decoder layers of {type(llm).__name__} for partial training")
    return layers
