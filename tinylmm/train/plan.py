"""Trainability is data: a stage's `tune` mapping becomes requires_grad flags and
optimizer parameter groups (own learning rate per component, no decay on norms/biases)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tinylmm.config import COMPONENTS, StageConfig, parse_trainability
from tinylmm.models.llm import decoder_layers


@dataclass
class PlanSummary:
    trainable: dict[str, int]  # component -> trainable parameter count
    total: dict[str, int]

    def describe(self) -> str:
        return ", ".join(f"{c} {self.trainable[c]:,}/{self.total[c]:,}" for c in COMPONENTS)


def _component_layers(model, component: str) -> nn.ModuleList | None:
    if component == "vision":
        return model.vision.layers
    if component == "llm":
        return decoder_layers(model.llm)
    return None


def _partial(module: nn.Module, layers: nn.ModuleList, first: int, component: str) -> None:
    """Layers from `first` on train; embeddings and earlier layers stay frozen.
    Parameters after the layer stack (final norm, LLM head) train with the top layers."""
    module.requires_grad_(False)
    for layer in layers[first:]:
        layer.requires_grad_(True)
    layer_params = {id(p) for p in layers.parameters()}
    seen_layers = False
    for name, p in module.named_parameters():
        if id(p) in layer_params:
            seen_layers = True
            continue
        if seen_layers and "embed" not in name:
            p.requires_grad_(True)
    if component == "llm":
        out = module.get_output_embeddings()
        if out is not None and out.weight is not module.get_input_embeddings().weight:
            out.weight.requires_grad_(True)


def apply_plan(model, stage: StageConfig, where: str = "stage") -> PlanSummary:
    for component in COMPONENTS:
        module = getattr(model, component)
        t = parse_trainability(stage.tune[component], f"{where}.tune.{component}")
        if t.mode == "frozen":
            module.requires_grad_(False)
        elif t.mode == "full":
            module.requires_grad_(True)
        else:
            layers = _component_layers(model, component)
            if layers is None:
                from tinylmm.config import ConfigError

                raise ConfigError(f"{where}.tune.{component}: the connector has no layers to train partially")
            _partial(module, layers, t.first_index(len(layers), f"{where}.tune.{component}"), component)
    return summarize(model)


def summarize(model) -> PlanSummary:
    trainable, total = {}, {}
    for component in COMPONENTS:
        params = list(getattr(model, component).parameters())
        trainable[component] = sum(p.numel() for p in params if p.requires_grad)
        total[component] = sum(p.numel() for p in params)
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
