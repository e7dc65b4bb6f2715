"""LoRA and QLoRA on the model's components, with peft and bitsandbytes (via transformers).

- LLM `lora`: peft `get_peft_model` on the causal LM; its adapter is saved in peft's own
  format (`adapter_config.json` + `adapter_model.safetensors`), loadable by
  `PeftModel.from_pretrained` on the base LLM.
- LLM `qlora`: the LLM is written once as the run's full-precision base
  (`<run>/<stage>/llm-base/`), reloaded from there in 4-bit NF4 (or 8-bit) by
  `from_pretrained(quantization_config=...)`, prepared for k-bit training, then given
  LoRA adapters. Under FSDP the packed 4-bit weights are stored in the compute dtype, the
  dtype the rest of the LLM is loaded in: bitsandbytes' FSDP-QLoRA guide, "It is very
  important the quant_storage data type matches the data types used throughout the model
  because FSDP can only wrap layers and modules that have the same floating data type"
  (`bnb_4bit_quant_storage`, with `torch_dtype` set to match it). Only the LLM is
  quantized: it is loaded on its own, so the vision tower and the connector can never be
  caught by the quantizer.
- vision `lora`: adapters injected in place into the tower's linear layers (the tower's
  forward reads its submodules directly, so it is not wrapped in a PeftModel); they are
  saved in `model.safetensors` with the rest of the tower.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from tinylmm.errors import ConfigError, did_you_mean
from tinylmm.files import write_atomically
from tinylmm.models.llm import attention_for
from tinylmm.models.loading import refusing_remote_code
from tinylmm.schema import LoraSpec, QuantSpec

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _require(what: str):
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{what} needs peft and bitsandbytes: pip install peft bitsandbytes (tinylmm's dependencies; did the "
            "install fail on this platform?)"
        ) from None


# --------------------------------------------------------------------------- targets


def linear_names(module: nn.Module, exclude: nn.Module | None = None) -> dict[str, int]:
    """Leaf names of the module's linear layers (bnb's 4/8-bit layers are nn.Linear too)
    -> how many layers carry that name. nn.MultiheadAttention's out_proj (open_clip's CLIP
    towers) is not one: the attention reads its weight directly, so an adapter wrapped
    around it would never run."""
    counts: dict[str, int] = {}
    for name in _linear_layers(module, exclude):
        leaf = name.rsplit(".", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + 1
    return counts


def _linear_layers(module: nn.Module, exclude: nn.Module | None = None) -> list[str]:
    inside_mha = {id(m.out_proj) for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and m is not exclude and "lora_" not in name and id(m) not in inside_mha
    ]


def resolve_targets(module: nn.Module, targets: list[str], where: str, exclude: nn.Module | None = None) -> list[str]:
    """`all-linear` -> every linear layer's name except `exclude` (the LLM's head); names
    are checked: one that matches no linear layer is a config error, never a silent no-op."""
    available = linear_names(module, exclude)
    if targets == ["all-linear"]:
        if exclude is not None:
            head_leaf = next((n.rsplit(".", 1)[-1] for n, m in module.named_modules() if m is exclude), None)
            if head_leaf in available:
                raise ConfigError(
                    f"{where}: the output head's name '{head_leaf}' is also used inside the model; "
                    "list the target modules explicitly in lora.targets"
                )
        return sorted(available)
    for t in targets:
        if t not in available:
            raise ConfigError(
                f"lora.targets: '{t}' matches no linear layer of the {where}"
                f"{did_you_mean(t, available)}; its linear layers are: {', '.join(sorted(available))}"
            )
    return list(targets)


def lora_config(spec: LoraSpec, targets: list[str], task_type: str | None = None, modules_to_save=None):
    from peft import LoraConfig

    # ensure_weight_tying: a trained copy of a tied head is the embedding too (one tensor),
    # so merging and saving cannot silently drop one of the two.
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        bias="none",
        task_type=task_type,
        modules_to_save=modules_to_save or None,
        ensure_weight_tying=bool(modules_to_save),
    )


def check_modules_to_save(llm: nn.Module, names: list[str]) -> list[str]:
    modules = [n for n, _ in llm.named_modules()]
    for name in names:
        if not any(n == name or n.endswith("." + name) for n in modules):
            raise ConfigError(f"lora.modules_to_save: '{name}' is no module of the llm{did_you_mean(name, modules)}")
    return names


# --------------------------------------------------------------------------- LLM


def is_peft(llm: nn.Module) -> bool:
    return hasattr(llm, "peft_config") and hasattr(llm, "get_base_model")


def is_quantized(llm: nn.Module) -> bool:
    base = llm.get_base_model() if is_peft(llm) else llm
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def storage_dtype(quant: QuantSpec, *, sharded: bool = False) -> torch.dtype:
    """`quant.storage_dtype` as a torch dtype; `auto`: the compute dtype when FSDP shards
    the model (`sharded`), else bitsandbytes' uint8."""
    if quant.storage_dtype == "auto":
        return DTYPES[quant.compute_dtype] if sharded else torch.uint8
    return torch.uint8 if quant.storage_dtype == "uint8" else DTYPES[quant.storage_dtype]


def bnb_config(quant: QuantSpec, *, sharded: bool = False):
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        bnb_4bit_quant_storage=storage_dtype(quant, sharded=sharded),
    )


def save_base(llm: nn.Module, base_dir: Path) -> None:
    """The LLM's full-precision weights as a transformers directory: what adapters sit on."""
    if not (base_dir / "config.json").exists():
        write_atomically(base_dir, lambda d: llm.save_pretrained(d))


def load_llm(
    directory: Path,
    *,
    quant: QuantSpec | None,
    device=None,
    attn_implementation: str = "sdpa",
    dtype=None,
    trust_remote_code: bool = False,
    sharded: bool = False,
) -> nn.Module:
    """A causal LM from a directory, in full precision or quantized by bitsandbytes.
    `trust_remote_code`: the run's model.llm.trust_remote_code (a saved remote-code LLM keeps
    its code beside its weights, and needs it again); `sharded`: the run is under FSDP (see
    `storage_dtype`)."""
    with refusing_remote_code("language model", directory):
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    kwargs = {
        "attn_implementation": attention_for(config, attn_implementation),
        "trust_remote_code": trust_remote_code,
    }
    if quant is not None:
        _require("4-bit / 8-bit loading")
        kwargs.update(
            quantization_config=bnb_config(quant, sharded=sharded),
            device_map={"": str(device or "cpu")},
            dtype=DTYPES[quant.compute_dtype],
        )
    elif dtype is not None:
        kwargs["dtype"] = dtype
    llm = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    if quant is not None:
        avoid_cpu_packing_assert(llm)
    return llm


def avoid_cpu_packing_assert(llm: nn.Module) -> None:
    """bitsandbytes 0.50 repacks 4-bit weights for its AVX512-bf16 CPU inference kernel,
    which needs output widths in multiples of 32 and input widths in whole quantization
    blocks (the toy's MLP is 344 wide: an assertion or a shape error). Such layers take
    bitsandbytes' general path, as they do in training."""
    import bitsandbytes as bnb

    for m in llm.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            block = getattr(m.weight.quant_state, "blocksize", 64)
            if m.out_features % 32 or m.in_features % block:
                m.support_avx512bf16_for_cpu = False


def quantize_llm(
    model, base_dir: Path, quant: QuantSpec, *, device, attn_implementation: str, sharded: bool = False
) -> None:
    """Swap the model's LLM for a k-bit copy of its current weights, prepared for training."""
    from peft import prepare_model_for_kbit_training

    _require("qlora")
    save_base(model.llm, base_dir)
    remote = model.spec.llm.trust_remote_code
    llm = load_llm(
        base_dir,
        quant=quant,
        device=device,
        attn_implementation=attn_implementation,
        trust_remote_code=remote,
        sharded=sharded,
    )
    # Casts the non-quantized parameters (embeddings, norms, head) to fp32 for stable training.
    model.llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    model.llm_base, model.llm_quant = base_dir, quant


def attach_llm_lora(model, spec: LoraSpec, base_dir: Path) -> None:
    from peft import get_peft_model

    _require("lora")
    if model.llm_base is None:  # qlora already wrote it
        save_base(model.llm, base_dir)
        model.llm_base = base_dir
    head = model.llm.get_output_embeddings()
    targets = resolve_targets(model.llm, spec.targets, "llm", exclude=head)
    keep = check_modules_to_save(model.llm, spec.modules_to_save)
    model.llm = get_peft_model(model.llm, lora_config(spec, targets, "CAUSAL_LM", keep))


def merge_llm_lora(model) -> None:
    """Fold the adapters into the (full-precision) base: the LLM is a plain model again."""
    if is_quantized(model.llm):
        raise ConfigError("cannot merge adapters into a quantized LLM while training; use `tinylmm merge`")
    model.llm = model.llm.merge_and_unload()
    model.llm_base = None


# --------------------------------------------------------------------------- vision


def attach_vision_lora(model, spec: LoraSpec) -> None:
    from peft import inject_adapter_in_model

    _require("lora")
    tower = model.vision.model
    names = set(resolve_targets(tower, spec.targets, "vision tower"))
    # peft matches target names by suffix, whatever the module: in open_clip's timm towers the
    # patch embedding (a Conv2d) and the attention output are both `proj`. Each linear layer
    # is named in full.
    paths = [n for n in _linear_layers(tower) if n.rsplit(".", 1)[-1] in names]
    inject_adapter_in_model(lora_config(spec, paths), tower)
    model.vision_lora = spec


def merge_vision_lora(model) -> None:
    from peft.tuners.lora import LoraLayer

    tower = model.vision.model
    for name, module in list(tower.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, leaf = name.rpartition(".")
            setattr(tower.get_submodule(parent_name) if parent_name else tower, leaf, module.get_base_layer())
    model.vision_lora = None


def has_vision_lora(model) -> bool:
    return model.vision_lora is not None


# --------------------------------------------------------------------------- merge


def dequantized_base(llm: nn.Module, base_dir: Path, trust_remote_code: bool = False) -> nn.Module:
    """The full-precision base with each quantized weight replaced by its dequantized
    value: the weights the adapters were trained against."""
    from peft.utils.integrations import dequantize_bnb_weight

    plain = load_llm(base_dir, quant=None, trust_remote_code=trust_remote_code)
    quantized = llm.get_base_model() if is_peft(llm) else llm
    targets = dict(plain.named_modules())
    for name, module in quantized.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and weight.__class__.__name__ in ("Params4bit", "Int8Params"):
            state = getattr(module, "state", None) if weight.__class__.__name__ == "Int8Params" else None
            w = dequantize_bnb_weight(weight, state=state).to(torch.float32)
            target = targets[name.replace(".base_layer", "")]  # peft wraps each adapted layer
            target.weight.data.copy_(w.to(target.weight.device, target.weight.dtype))
    return plain


def merged_llm(model, adapter_dir: Path, *, full_precision_base: bool = False) -> nn.Module:
    """The model's LLM with the adapters of `adapter_dir` folded into its base: after QLoRA
    the dequantized 4-bit base they were trained against (so the merged model answers as the
    trained one did), or with `full_precision_base` the original one."""
    from peft import PeftModel

    remote = model.spec.llm.trust_remote_code
    if is_quantized(model.llm) and not full_precision_base:
        base = dequantized_base(model.llm, model.llm_base, remote)
    else:
        base = load_llm(model.llm_base, quant=None, trust_remote_code=remote)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
