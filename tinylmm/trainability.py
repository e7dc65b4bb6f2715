"""Trainability is data: what each component does in each stage, and what follows from it.

A stage's `tune` mapping gives each component (vision, connector, llm) a mode:

    frozen      nothing trains
    full        every parameter trains
    partial:N   layers N.. train (N, -N from the end, or P% of the depth), with what follows
                the layer stack (final norm, an untied LLM head); embeddings stay frozen
    lora        LoRA adapters on the frozen component (LLM or vision tower)
    qlora       LoRA adapters on the LLM's 4-bit (or 8-bit) base

This one module turns modes into everything else, for config validation, the training loop
and the memory planner alike: the structure each component has in each stage
(`structures`: adapters persist, merge or quantize), which parameters train
(`apply`, `partial_trainable`), each component's learning rate (`rates`) and the optimizer's
parameter groups (`param_groups`). It reads the model through its components' parameters
and `model.layer_stack(component)` only, so the planner's meta-device model and a real one
are treated alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from tinylmm.errors import ConfigError, did_you_mean
from tinylmm.schema import COMPONENTS, RunConfig, StageConfig

Mode = Literal["frozen", "full", "partial", "lora", "qlora"]
Structure = Literal["plain", "lora", "qlora"]
MODES = ("frozen", "full", "partial:", "lora", "qlora")


@dataclass(frozen=True)
class Trainability:
    mode: Mode
    first_layer: str | None = None  # partial only: "12", "-2" or "50%" (resolved against the depth)

    def first_index(self, num_layers: int, where: str = "") -> int:
        spec = self.first_layer or "0"
        if spec.endswith("%"):
            idx = round(num_layers * float(spec[:-1]) / 100)
        else:
            idx = int(spec)
            if idx < 0:
                idx += num_layers
        if not 0 <= idx < num_layers:
            raise ConfigError(
                f"{where}: partial:{spec} asks for layer {idx}, but the component has "
                f"{num_layers} layers (use partial:-N or partial:P% for small towers)"
            )
        return idx

    @property
    def adapters(self) -> bool:
        return self.mode in ("lora", "qlora")


def parse(text: str, where: str = "tune") -> Trainability:
    """`frozen`, `full`, `partial:N`, `lora` or `qlora`, checked against the component named
    at the end of `where` (stages.x.tune.<component>)."""
    text = str(text).strip()
    if text in ("frozen", "full", "lora", "qlora"):
        if text == "qlora" and where.endswith(("vision", "connector")):
            raise ConfigError(f"{where}: qlora quantizes the LLM only; use lora, full or frozen here")
        if text == "lora" and where.endswith("connector"):
            raise ConfigError(f"{where}: the connector is small; train it full or keep it frozen")
        return Trainability(text)
    if text.startswith("partial:"):
        spec = text.split(":", 1)[1].strip()
        try:
            if spec.endswith("%") and not 0 <= float(spec[:-1]) <= 100:  # nan and inf fail too
                raise ValueError(spec)
            if not spec.endswith("%"):
                int(spec)
        except ValueError:
            raise ConfigError(
                f"{where}: '{text}' needs a layer index, e.g. partial:12, partial:-2 or partial:50% (0-100%)"
            ) from None
        return Trainability("partial", spec)
    raise ConfigError(
        f"{where}: '{text}' is not one of frozen, full, partial:<layer>, lora, qlora{did_you_mean(text, MODES)}"
    )


def mode(stage: StageConfig, component: str, where: str = "stage") -> Trainability:
    return parse(stage.tune[component], f"{where}.tune.{component}")


def structures(cfg: RunConfig, component: str) -> dict[str, Structure]:
    """Stage -> the component's structure in it: 'plain', 'lora' (adapters on a
    full-precision base) or 'qlora' (adapters on a quantized base). Adapters persist
    through later `frozen` stages and keep training in later stages of the same mode;
    `full`/`partial` after `lora` merges them first. Going back from a quantized base is
    refused: its full-precision weights are gone (merge the run with `tinylmm merge`, then
    train from the result)."""
    state, out = "plain", {}
    for name, st in cfg.stages.items():
        m = mode(st, component, f"stages.{name}").mode
        if state == "qlora" and m not in ("qlora", "frozen"):
            raise ConfigError(
                f"stages.{name}.tune.{component}: '{m}' after a qlora stage; the base is 4-bit "
                "from then on, so later stages can only be qlora or frozen"
            )
        if state == "lora" and m == "qlora":
            raise ConfigError(
                f"stages.{name}.tune.{component}: qlora after a lora stage; use lora (adapters on "
                "the full-precision base) or start with qlora"
            )
        if m in ("lora", "qlora"):
            state = m
        elif m in ("full", "partial"):
            state = "plain"
        out[name] = state
    return out


def only_frozen(cfg: RunConfig, component: str) -> bool:
    """No stage trains the component's own weights (adapters aside): a frozen base throughout."""
    return all(mode(st, component).mode in ("frozen", "lora", "qlora") for st in cfg.stages.values())


# --------------------------------------------------------------------------- learning rates


def rates(stage: StageConfig) -> dict[str, float]:
    """Component -> learning rate: its own (`llm_lr`, `connector_lr`, `vision_lr`) where set,
    else the stage's `lr`. An explicit rate is always taken as given."""
    own = {"llm": stage.llm_lr, "connector": stage.connector_lr, "vision": stage.vision_lr}
    return {c: stage.lr if own[c] is None else own[c] for c in COMPONENTS}


def check_rates(stage: StageConfig, where: str) -> None:
    for key in ("lr", "llm_lr", "connector_lr", "vision_lr"):
        value = getattr(stage, key)
        if value is not None and not 0 < value < math.inf:
            raise ConfigError(
                f"{where}.{key}={value} must be positive and finite (to keep a component as it is, "
                f"set {where}.tune.<component>: frozen)"
            )


# --------------------------------------------------------------------------- on a model


def partial_trainable(module, layers, first: int, component: str) -> list:
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


def partial_parameters(model, component: str, t: Trainability, where: str) -> list:
    layers = model.layer_stack(component)
    if layers is None:
        raise ConfigError(f"{where}: the {component} has no layers to train partially")
    return partial_trainable(getattr(model, component), layers, t.first_index(len(layers), where), component)


def check_partial_layers(model, cfg: RunConfig) -> None:
    """Every stage's `partial:N` against the built model's depth, before any stage runs: a
    wrong index must not surface after hours of an earlier stage."""
    for name, stage in cfg.stages.items():
        for component in ("vision", "llm"):
            t = mode(stage, component, f"stages.{name}")
            if t.mode == "partial":
                t.first_index(len(model.layer_stack(component)), f"stages.{name}.tune.{component}")


def is_adapter_param(name: str) -> bool:
    """LoRA weights, and peft's trained copies of `lora.modules_to_save`."""
    return "lora_" in name or "modules_to_save." in name


def apply(model, stage: StageConfig, where: str = "stage") -> Counts:
    """Set requires_grad on every parameter as the stage's modes say; returns the counts."""
    for component in COMPONENTS:
        module = getattr(model, component)
        t = mode(stage, component, where)
        if t.mode == "frozen":
            module.requires_grad_(False)
        elif t.mode == "full":
            module.requires_grad_(True)
        elif t.adapters:
            module.requires_grad_(False)
            n = 0
            for pname, p in module.named_parameters():
                if is_adapter_param(pname):
                    p.requires_grad_(True)
                    n += 1
            if not n:
                raise ConfigError(f"{where}.tune.{component}: {t.mode} but the {component} has no adapters")
        else:
            module.requires_grad_(False)
            for p in partial_parameters(model, component, t, f"{where}.tune.{component}"):
                p.requires_grad_(True)
    return counts(model)


def numel(p) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight holds two per byte."""
    state = getattr(p, "quant_state", None)
    return int(state.shape.numel()) if state is not None else p.numel()


@dataclass
class Counts:
    trainable: dict[str, int]  # component -> trainable parameter count
    total: dict[str, int]

    def describe(self) -> str:
        return ", ".join(f"{c} {self.trainable[c]:,}/{self.total[c]:,}" for c in COMPONENTS)


def counts(model) -> Counts:
    trainable, total = {}, {}
    for component in COMPONENTS:
        params = list(getattr(model, component).parameters())
        trainable[component] = sum(numel(p) for p in params if p.requires_grad)
        total[component] = sum(numel(p) for p in params)
    return Counts(trainable, total)


def param_groups(model, stage: StageConfig) -> list[dict]:
    """One group per (component, decay or not), each with the component's own rate; no
    weight decay on norms and biases."""
    lrs = rates(stage)
    groups = []
    for component in COMPONENTS:
        decay, no_decay = [], []
        for name, p in getattr(model, component).named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        for params, wd, kind in ((decay, stage.weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append(
                    {"params": params, "lr": lrs[component], "weight_decay": wd, "name": f"{component}/{kind}"}
                )
    return groups
