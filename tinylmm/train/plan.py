"""Trainability is data: a stage's `tune` mapping becomes the model's structure for the
stage (LoRA adapters attached, the LLM quantized, adapters merged back), requires_grad
flags and optimizer parameter groups (own learning rate per component, no decay on
norms/biases)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tinylmm.config import COMPONENTS, ConfigError, RunConfig, StageConfig, component_states, parse_trainability
from tinylmm.models import adapters
from tinylmm.models.llm import decoder_layers

log = logging.getLogger(__name__)


@dataclass
class PlanSummary:
    trainable: dict[str, int]  # component -> trainable parameter count
    total: dict[str, int]

    def describe(self) -> str:
        return ", ".join(f"{c} {self.trainable[c]:,}/{self.total[c]:,}" for c in COMPONENTS)


def component_layers(model, component: str) -> nn.ModuleList | None:
    """The layer stack partial training counts in (none for the connector)."""
    if component == "vision":
        return model.vision.layers
    if component == "llm":
        return decoder_layers(model.llm)
    return None


def partial_trainable(module: nn.Module, layers: nn.ModuleList, first: int, component: str) -> list[nn.Parameter]:
    """What `partial:<first>` trains: the layers from `first` on, and the parameters after
    the layer stack (final norm, LLM head) with the top layers; embeddings and earlier
    layers stay frozen. An untied LLM head trains too."""
    out = [p for layer in layers[first:] for p in layer.parameters()]
    layer_params = {id(p) for p in layers.parameters()}
    seen_layers = False
    for name, p in module.named_parameters():
        if id(p) in layer_params:
            seen_layers = True
        elif seen_layers and "embed" not in name:
            out.append(p)
    if component == "llm":
        head = module.get_output_embeddings()
        if head is not None and head.weight is not module.get_input_embeddings().weight:
            out.append(head.weight)
    return out


def _partial(module: nn.Module, layers: nn.ModuleList, first: int, component: str) -> None:
    module.requires_grad_(False)
    for p in partial_trainable(module, layers, first, component):
        p.requires_grad_(True)


def prepare_stage(model, cfg: RunConfig, name: str, run_dir: Path, *, device="cpu", attn_implementation="sdpa",
                  half_dtype: torch.dtype | None = None) -> tuple[PlanSummary, list[str]]:
    """Give the model the structure stage `name` needs, then its trainability plan.

    Structure changes follow `config.component_states`: attach adapters (and quantize the
    LLM for qlora, from a base written to `<run>/<stage>/llm-base/`), keep them through
    lora/qlora/frozen stages, merge them before a full/partial stage. Returns the plan
    summary and one line per change made, for the log. With `half_dtype` (bf16/fp16 mixed
    precision), frozen weights are stored in it: they only feed autocast matmuls."""
    notes = []
    llm_state = dict(component_states(cfg, "llm"))[name]
    vision_state = dict(component_states(cfg, "vision"))[name]
    has_llm_lora = adapters.is_peft(model.llm)
    if llm_state == "plain" and has_llm_lora:
        adapters.merge_llm_lora(model)
        notes.append("llm: LoRA adapters merged into the base")
    elif llm_state in ("lora", "qlora") and not has_llm_lora:
        base_dir = run_dir / name / "llm-base"
        if llm_state == "qlora":
            adapters.quantize_llm(model, base_dir, cfg.quant, device=device, attn_implementation=attn_implementation)
            kernels = "CUDA kernels" if torch.device(device).type == "cuda" else \
                "bitsandbytes' CPU fallback kernels (no GPU: slower than CUDA)"
            notes.append(f"llm: reloaded from {base_dir} in {cfg.quant.bits}-bit"
                         + (f" {cfg.quant.quant_type}, double quant {cfg.quant.double_quant}, "
                            f"compute {cfg.quant.compute_dtype}" if cfg.quant.bits == 4 else " (LLM.int8)")
                         + f"; {kernels}")
        adapters.attach_llm_lora(model, cfg.lora, base_dir)
        notes.append(f"llm: LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} dropout={cfg.lora.dropout} on "
                     f"{', '.join(sorted(model.llm.peft_config['default'].target_modules))}"
                     + (f"; trained in full: {', '.join(cfg.lora.modules_to_save)}" if cfg.lora.modules_to_save else ""))
    if vision_state == "plain" and adapters.has_vision_lora(model):
        adapters.merge_vision_lora(model)
        notes.append("vision: LoRA adapters merged into the tower")
    elif vision_state == "lora" and not adapters.has_vision_lora(model):
        adapters.attach_vision_lora(model, cfg.lora)
        notes.append(f"vision: LoRA r={cfg.lora.r} alpha={cfg.lora.alpha}")
    # New adapters are created on the CPU; a k-bit LLM is loaded on its device already and
    # is not moved again (bitsandbytes' packed weights and their quant states move apart).
    for part in (model.vision, model.connector) if adapters.is_quantized(model.llm) else (model,):
        part.to(device)
    summary = apply_plan(model, cfg.stages[name], f"stages.{name}")
    if half_dtype is not None:
        store_frozen_in(model, half_dtype)
    return summary, notes


def store_frozen_in(model, dtype: torch.dtype) -> None:
    """Frozen float weights in `dtype`, trainable ones in fp32 (the optimizer's master copy).
    A quantized LLM keeps what k-bit preparation chose (fp32 norms, embeddings, head)."""
    skip = set(map(id, model.llm.parameters())) if adapters.is_quantized(model.llm) else set()
    for p in model.parameters():
        if id(p) in skip or not p.is_floating_point():
            continue
        want = torch.float32 if p.requires_grad else dtype
        if p.dtype != want:
            p.data = p.data.to(want)


def check_partial_layers(model, cfg: RunConfig) -> None:
    """Every stage's `partial:N` against the built model's depth, before any stage runs: a
    wrong index must not surface after hours of an earlier stage."""
    for name, stage in cfg.stages.items():
        for component in ("vision", "llm"):
            t = parse_trainability(stage.tune[component], f"stages.{name}.tune.{component}")
            if t.mode == "partial":
                t.first_index(len(component_layers(model, component)), f"stages.{name}.tune.{component}")


def apply_plan(model, stage: StageConfig, where: str = "stage") -> PlanSummary:
    for component in COMPONENTS:
        module = getattr(model, component)
        t = parse_trainability(stage.tune[component], f"{where}.tune.{component}")
        if t.mode == "frozen":
            module.requires_grad_(False)
        elif t.mode == "full":
            module.requires_grad_(True)
        elif t.mode in ("lora", "qlora"):
            module.requires_grad_(False)
            n = 0
            for pname, p in module.named_parameters():
                if "lora_" in pname or "modules_to_save." in pname:
                    p.requires_grad_(True)
                    n += 1
            if not n:
                raise ConfigError(f"{where}.tune.{component}: {t.mode} but the {component} has no adapters")
        else:
            layers = component_layers(model, component)
            if layers is None:
                raise ConfigError(f"{where}.tune.{component}: the connector has no layers to train partially")
            _partial(module, layers, t.first_index(len(layers), f"{where}.tune.{component}"), component)
    return summarize(model)


def numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight holds two per byte."""
    state = getattr(p, "quant_state", None)
    return int(state.shape.numel()) if state is not None else p.numel()


def summarize(model) -> PlanSummary:
    trainable, total = {}, {}
    for component in COMPONENTS:
        params = list(getattr(model, component).parameters())
        trainable[component] = sum(numel(p) for p in params if p.requires_grad)
        total[component] = sum(numel(p) for p in params)
    return PlanSummary(trainable, total)


def param_groups(model, stage: StageConfig) -> list[dict]:
    """One group per (component, decay or not), each with the component's own lr."""
    lrs = {"vision": stage.vision_lr or stage.lr, "connector": stage.connector_lr or stage.lr, "llm": stage.lr}
    groups = []
    for component in COMPONENTS:
        decay, no_decay = [], []
        for name, p in getattr(model, component).named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        for params, wd, kind in ((decay, stage.weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": lrs[component], "weight_decay": wd,
                               "name": f"{component}/{kind}"})
    return groups
