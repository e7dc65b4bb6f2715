"""The typed run configuration and how it is assembled.

One run is described by one `RunConfig`, built from layers applied in this order:

    defaults (the dataclasses below)
      <- preset  (model_zoo.yaml: the model, plus `stage_defaults` for small presets)
      <- recipe  (a shipped recipes/*.yaml, or a user's recipe file)
      <- preset stage_defaults (per stage name, e.g. the toy preset's short schedule;
         shipped recipes only: a user's recipe file is taken as written)
      <- user overrides (`key=value`, dotted; stages are addressed by name)

Every key is checked against the schema: an unknown key is an error with a
suggestion. The run saves the resolved config with, on each value, the layer that
set it (see `dump_resolved`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key at fault."""


def did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, options) -> ConfigError:
    options = sorted(options)
    return ConfigError(f"unknown {kind} '{name}'{did_you_mean(name, options)}; known: {', '.join(options)}")


# --------------------------------------------------------------------------- schema


@dataclass
class LLMSpec:
    name_or_path: str | None = None  # hub id or local directory (weights loaded from there)
    config: dict | None = None  # inline architecture config: random init (toy preset, tests)
    tokenizer: str | None = None  # hub id / directory / "builtin:toy"; default: name_or_path


@dataclass
class VisionSpec:
    # hub id or local directory (transformers' CLIP / SigLIP / DINOv2), or open_clip:<model name>
    name_or_path: str | None = None
    config: dict | None = None
    # open_clip towers only: open_clip's pretrained tag (webli, openai ...), a directory with a
    # download of the tag's hub repo, or a checkpoint file; absent: random initialisation
    pretrained: str | None = None
    feature_layer: int = -2  # hidden_states index: -2 = penultimate layer, as LLaVA/TinyLLaVA
    # patch: drop the CLS token where the tower has one (CLIP: 577 -> 576; SigLIP keeps its 729)
    # cls_patch: keep every token
    # drop_first: drop token 0 whatever it is: TinyLLaVA_Factory's `patch`, which on SigLIP
    #   (no CLS) removes a real patch: so400m-patch14-384 gives 728 tokens, not 729
    select: Literal["patch", "cls_patch", "drop_first"] = "patch"
    pad_to_square: bool = True  # pad with the mean colour before resizing (LLaVA "pad")
    # input size in pixels, a multiple of the patch size; None: the config's image_size. Only for
    # towers that interpolate their position embeddings (DINOv2: published at 518, fed 224 = 16x16
    # patches here, as DINOv2's own 224 px evaluation)
    image_size: int | None = None
    image_mean: list[float] | None = None  # default: preprocessor_config.json or the family's
    image_std: list[float] | None = None


@dataclass
class ConnectorSpec:
    type: str = "mlp2x_gelu"
    num_queries: int = 64  # resampler: visual tokens per image
    depth: int = 2  # resampler: cross-attention blocks
    num_heads: int = 8  # resampler


@dataclass
class ModelSpec:
    llm: LLMSpec = field(default_factory=LLMSpec)
    vision: VisionSpec = field(default_factory=VisionSpec)
    connector: ConnectorSpec = field(default_factory=ConnectorSpec)
    template: str = "phi"  # conversation format of the instruction stages
    seed: int = 0  # initialisation of randomly initialised parts (connector, toy models)


@dataclass
class DataSpec:
    """Where a stage's samples come from: a LLaVA-format JSON, or a split of `shapes`."""

    json: str | None = None
    images: str | None = None  # image folder the JSON's relative `image` paths start from
    shapes: Literal["caption", "instruct"] | None = None


@dataclass
class StageConfig:
    data: DataSpec = field(default_factory=DataSpec)
    template: str | None = None  # None: the model's template; "pretrain" for caption alignment
    # per component: frozen | full | partial:<first trainable layer> (N, -N from the end, or P%)
    # | lora (LLM or vision: adapters on a frozen base) | qlora (LLM: adapters on a 4-bit base)
    tune: dict[str, str] = field(
        default_factory=lambda: {"vision": "frozen", "connector": "full", "llm": "frozen"}
    )
    lr: float = 2e-5
    connector_lr: float | None = None  # own learning rate for the connector (default: lr)
    vision_lr: float | None = None  # own learning rate for the vision tower (default: lr)
    batch_size: int = 128  # global: micro_batch_size x processes x accumulation steps
    micro_batch_size: int = 4
    epochs: float = 1.0
    max_steps: int | None = None  # stop early (optimizer steps); the schedule spans these
    warmup_ratio: float = 0.03
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = 2048  # tokens, visual tokens included
    save_every: int | None = None  # optimizer steps between step-N checkpoints


@dataclass
class ShapesConfig:
    seed: int = 0
    n_caption: int = 2000
    n_instruct: int = 2000
    n_eval: int = 300
    image_size: int | None = None  # default: the vision tower's input size


@dataclass
class LoraSpec:
    """Adapters of the `lora` / `qlora` modes. Defaults: TinyLLaVA's LoRA settings."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    # module names (suffixes such as q_proj) or "all-linear": every linear layer of the
    # component except the LLM's output head
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    # LLM modules trained in full next to the adapters and saved with them (peft's
    # modules_to_save), by name or name suffix, e.g. model.norm
    modules_to_save: list[str] = field(default_factory=list)
    lr: float = 2e-4  # the LLM's learning rate in stages that `--tune lora|qlora` switches


@dataclass
class QuantSpec:
    """How `qlora` stores the frozen LLM base (bitsandbytes through transformers)."""

    bits: Literal[4, 8] = 4  # 4: QLoRA (NF4); 8: LLM.int8 base
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True  # quantize the 4-bit scales too (~0.4 bit/param saved)
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")


@dataclass
class TrainConfig:
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # adamw: torch; *_8bit: bitsandbytes 8-bit states (2 bytes/param instead of 8);
    # paged_*: bitsandbytes states in CUDA unified memory (evicted to RAM under pressure)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    gradient_checkpointing: bool = False
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    num_workers: int = 0
    seed: int = 0  # data order


@dataclass
class EvalConfig:
    bench: list[str] = field(default_factory=lambda: ["shapes"])  # run after the last stage
    batch_size: int = 32
    max_new_tokens: int = 8


@dataclass
class RunConfig:
    preset: str = "toy"
    recipe: str = "share"
    output_dir: str | None = None  # default: runs/<preset>-<recipe>-<timestamp>
    model: ModelSpec = field(default_factory=ModelSpec)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys whose value replaces the previous layer's as a whole instead of merging into it:
# a stage that reads `{shapes: caption}` must not inherit the recipe's `json:` path.
ATOMIC_KEYS = {"data", "config"}
COMPONENTS = ("vision", "connector", "llm")
BENCHMARKS = ("shapes",)


# --------------------------------------------------------------------------- typed build


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(tp, value, where: str):
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: '{value}' is not one of {list(allowed)}{did_you_mean(value, allowed)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {k: _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (it,) = typing.get_args(tp)
        return [_coerce(it, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass `cls` from a mapping; unknown keys are errors with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key '{where}.{key}'{did_you_mean(key, names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- layering


def parse_override(text: str) -> tuple[list[str], Any]:
    """`stages.finetune.lr=1e-4` -> (["stages", "finetune", "lr"], 0.0001). Values are YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    return path, _yaml11_floats(value)


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _yaml11_floats(value):
    """YAML 1.1 reads 1e-4 and 1e-06 as strings; numbers written that way are meant as
    floats, at any depth (an inline architecture config: `{layer_norm_eps: 1e-06}`)."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _yaml11_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml11_floats(v) for v in value]
    return value


class Layers:
    """Merges mappings layer by layer and remembers which layer set each leaf."""

    def __init__(self):
        self.data: dict = {}
        self.sources: dict[str, str] = {}

    def apply(self, mapping: dict, source: str, prefix: tuple[str, ...] = ()):
        node = self.data
        for p in prefix:
            node = node.setdefault(p, {})
        self._merge(node, mapping, source, list(prefix))

    def set(self, path: list[str], value, source: str):
        node = self.data
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{'.'.join(path)}': '{p}' is a value, not a section")
            node = nxt
        if isinstance(value, dict) and path[-1] not in ATOMIC_KEYS:
            self._merge(node.setdefault(path[-1], {}), value, source, list(path))
        else:
            self._forget(path)
            node[path[-1]] = copy.deepcopy(value)
            self.sources[".".join(path)] = source

    def _merge(self, node: dict, mapping: dict, source: str, path: list[str]):
        for k, v in mapping.items():
            sub = path + [str(k)]
            if isinstance(v, dict) and k not in ATOMIC_KEYS and isinstance(node.get(k, {}), dict):
                self._merge(node.setdefault(k, {}), v, source, sub)
            else:
                self._forget(sub)
                node[k] = copy.deepcopy(v)  # never alias a layer's data (the zoo is cached)
                self.sources[".".join(sub)] = source

    def _forget(self, path: list[str]):
        prefix = ".".join(path) + "."
        for key in [k for k in self.sources if k.startswith(prefix)]:
            del self.sources[key]


def default_stage_name_check(stages: dict, name: str, where: str):
    if name not in stages:
        raise unknown(f"stage in {where}", name, stages)


def resolve(
    preset: str = "toy",
    recipe: str = "share",
    overrides: list[str] | tuple[str, ...] = (),
    *,
    output_dir: str | None = None,
    tune: str | None = None,
    llm: str | None = None,
    vision: str | None = None,
) -> tuple[RunConfig, dict[str, str]]:
    """Assemble the run config from preset + recipe + overrides (+ the `--tune` switch).
    `llm` / `vision` (the `--llm PATH` / `--vision PATH` flags) load that part of the preset
    from a local directory or another hub id; `key=value` overrides still win.
    Returns (config, sources)."""
    from tinylmm import zoo
    from tinylmm.models.openclip import is_openclip
    from tinylmm.recipes import load_recipe

    parsed = [parse_override(o) for o in overrides]
    # `preset=` / `recipe=` given as overrides choose the layers themselves.
    for path, value in parsed:
        if path == ["preset"]:
            preset = str(value)
        elif path == ["recipe"]:
            recipe = str(value)

    p = zoo.get(preset)
    r = load_recipe(recipe)
    layers = Layers()
    layers.apply({"preset": p.name, "recipe": r.name}, "cli")
    layers.apply({"model": p.model}, f"preset:{p.name}")
    layers.apply({k: v for k, v in r.settings.items() if k != "stages"}, f"recipe:{r.name}")
    layers.apply({"stages": r.stages}, f"recipe:{r.name}")
    # A preset's stage defaults adapt the *shipped* recipes to it (the toy's CPU schedule on
    # the shapes data). A recipe file of the user's is taken as written.
    if r.shipped:
        for stage, values in p.stage_defaults.items():
            if stage in r.stages:  # a preset may tune stages the chosen recipe does not have
                layers.apply(values, f"preset:{p.name}", ("stages", stage))
    for key, value in p.settings.items():
        layers.apply({key: value}, f"preset:{p.name}")
    # The weights come from PATH, so the preset's inline architecture (if any) no longer
    # applies; an LLM directory holds its tokenizer too.
    if llm is not None:
        layers.set(["model", "llm"], {"name_or_path": str(llm), "tokenizer": str(llm), "config": None}, "cli --llm")
    if vision is not None:
        if is_openclip(VisionSpec(name_or_path=layers.data["model"]["vision"].get("name_or_path"))):
            # the architecture stays open_clip's model config; the weights come from PATH
            layers.set(["model", "vision", "pretrained"], str(vision), "cli --vision")
        else:
            layers.set(["model", "vision", "name_or_path"], str(vision), "cli --vision")
            layers.set(["model", "vision", "config"], None, "cli --vision")
    for path, value in parsed:
        if path in (["preset"], ["recipe"]):
            continue
        if path[0] == "stages" and len(path) >= 2:
            default_stage_name_check(r.stages, path[1], "override")
        layers.set(path, value, "override")
    if tune is not None:
        apply_tune_switch(layers, tune)
    if output_dir is not None:
        layers.set(["output_dir"], output_dir, "cli")
    cfg = from_dict(RunConfig, layers.data)
    validate(cfg)
    return cfg, layers.sources


def validate(cfg: RunConfig) -> None:
    from tinylmm.data.templates import template_names
    from tinylmm.models.connectors import CONNECTORS
    from tinylmm.models.openclip import is_openclip

    templates = template_names()  # phi, llama, pretrain, and auto: the tokenizer's chat template
    if cfg.model.connector.type not in CONNECTORS:
        raise unknown("connector", cfg.model.connector.type, CONNECTORS)
    if cfg.model.template not in templates:
        raise unknown("template", cfg.model.template, templates)
    if not cfg.stages:
        raise ConfigError("the recipe has no stages")
    for bench in cfg.eval.bench:
        if bench not in BENCHMARKS:
            raise unknown("benchmark in eval.bench", bench, BENCHMARKS)
    for name, st in cfg.stages.items():
        where = f"stages.{name}"
        if st.template is not None and st.template not in templates:
            raise unknown(f"template in {where}.template", st.template, templates)
        for comp in st.tune:
            if comp not in COMPONENTS:
                raise unknown(f"component in {where}.tune", comp, COMPONENTS)
        for comp in COMPONENTS:
            st.tune.setdefault(comp, "frozen")
            parse_trainability(st.tune[comp], f"{where}.tune.{comp}")
        if (st.data.json is None) == (st.data.shapes is None):
            raise ConfigError(f"{where}.data: give exactly one of 'json' (with 'images') or 'shapes'")
        if st.batch_size % st.micro_batch_size:
            raise ConfigError(
                f"{where}: batch_size {st.batch_size} is not a multiple of micro_batch_size {st.micro_batch_size}"
            )
        if st.lr <= 0 or st.epochs <= 0 or st.max_len <= 0:
            raise ConfigError(f"{where}: lr, epochs and max_len must be positive")
        if not 0 <= st.warmup_ratio < 1:
            raise ConfigError(f"{where}.warmup_ratio must be in [0, 1)")
    for comp in ("vision", "llm"):
        component_states(cfg, comp)
    vision = cfg.model.vision
    if is_openclip(vision):
        if vision.config is not None:
            raise ConfigError("model.vision: an open_clip tower takes its architecture from open_clip's model "
                              "configs; give 'name_or_path: open_clip:<model>' or an inline 'config', not both")
        if vision.select == "drop_first":
            raise ConfigError("model.vision.select: drop_first is TinyLLaVA_Factory's rule for transformers' "
                              "towers; an open_clip tower takes patch (prefix tokens dropped) or cls_patch")
        if vision.image_size is not None:
            raise ConfigError("model.vision.image_size: an open_clip tower takes the input size of its model "
                              "config (choose an open_clip model of that size)")
    elif vision.pretrained is not None:
        raise ConfigError("model.vision.pretrained names the weights of an open_clip tower (name_or_path: "
                          "open_clip:<model>); a hub id or directory brings its own weights")
    if vision.image_size is not None and vision.image_size <= 0:
        raise ConfigError(f"model.vision.image_size={vision.image_size} must be positive (or null: the tower's own)")
    if cfg.lora.r <= 0 or cfg.lora.alpha <= 0 or not 0 <= cfg.lora.dropout < 1 or not cfg.lora.targets:
        raise ConfigError("lora: r and alpha must be positive, dropout in [0, 1), targets not empty")


@dataclass(frozen=True)
class Trainability:
    mode: Literal["frozen", "full", "partial", "lora", "qlora"]
    first_layer: str | None = None  # "12", "-2" or "50%" (resolved against the tower's depth)

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


MODES = ("frozen", "full", "partial:", "lora", "qlora")


def parse_trainability(text: str, where: str = "tune") -> Trainability:
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
            float(spec[:-1]) if spec.endswith("%") else int(spec)
        except ValueError:
            raise ConfigError(f"{where}: '{text}' needs a layer index, e.g. partial:12, partial:-2 or partial:50%") from None
        return Trainability("partial", spec)
    raise ConfigError(f"{where}: '{text}' is not one of frozen, full, partial:<layer>, lora, qlora"
                      f"{did_you_mean(text, MODES)}")


def component_states(cfg: RunConfig, component: str) -> list[tuple[str, str]]:
    """(stage, structure) per stage: 'plain', 'lora' (adapters on a full-precision base) or
    'qlora' (adapters on a quantized base). Adapters persist through later `frozen` stages
    and keep training in later stages of the same mode; `full`/`partial` after `lora`
    merges them first. Going back from a quantized base is refused: its full-precision
    weights are gone (merge the run with `tinylmm merge`, then train from the result)."""
    state, out = "plain", []
    for name, st in cfg.stages.items():
        mode = parse_trainability(st.tune[component], f"stages.{name}.tune.{component}").mode
        if state == "qlora" and mode not in ("qlora", "frozen"):
            raise ConfigError(f"stages.{name}.tune.{component}: '{mode}' after a qlora stage; the base is 4-bit "
                              "from then on, so later stages can only be qlora or frozen")
        if state == "lora" and mode == "qlora":
            raise ConfigError(f"stages.{name}.tune.{component}: qlora after a lora stage; use lora (adapters on "
                              "the full-precision base) or start with qlora")
        if mode in ("lora", "qlora"):
            state = mode
        elif mode in ("full", "partial"):
            state = "plain"
        out.append((name, state))
    return out


TUNE_SWITCHES = ("full", "lora", "qlora")


def apply_tune_switch(layers: Layers, mode: str) -> None:
    """`--tune lora|qlora`: every stage that trains the LLM (full or partial) trains it with
    adapters instead, at `lora.lr` (TinyLLaVA: 2e-4), while the connector and the vision
    tower keep the stage's own rate (as LLaVA-1.5's LoRA script: mm_projector_lr 2e-5).
    Values the user set with an override are kept. `--tune full` leaves the recipe as is."""
    if mode not in TUNE_SWITCHES:
        raise unknown("--tune mode", mode, TUNE_SWITCHES)
    if mode == "full":
        return
    source = f"--tune {mode}"
    lora_lr = float(layers.data.get("lora", {}).get("lr", LoraSpec.lr))
    for name, st in layers.data.get("stages", {}).items():
        llm = str(st.get("tune", {}).get("llm", "frozen"))
        if not (llm == "full" or llm.startswith("partial:")):
            continue
        mine = lambda key: layers.sources.get(f"stages.{name}.{key}") == "override"  # noqa: E731
        if mine("tune.llm"):
            continue
        stage_lr = st.get("lr", StageConfig.lr)
        layers.set(["stages", name, "tune", "llm"], mode, source)
        if not mine("lr"):
            layers.set(["stages", name, "lr"], lora_lr, source)
        if st.get("connector_lr") is None:
            layers.set(["stages", name, "connector_lr"], stage_lr, source)
        if st.get("vision_lr") is None and st.get("tune", {}).get("vision", "frozen") != "frozen":
            layers.set(["stages", name, "vision_lr"], stage_lr, source)


# --------------------------------------------------------------------------- saving


def dump_resolved(cfg: RunConfig, sources: dict[str, str], path: Path) -> None:
    """Write the resolved config as YAML, each value annotated with the layer that set it."""
    lines = [
        "# tinylmm resolved run config. Layers, later wins: defaults < preset < recipe <",
        "# preset stage_defaults < override. The comment on a value names the layer that set it",
        "# (no comment: the default). Re-run with: tinylmm train --config THIS_FILE",
    ]

    def emit(node: dict, indent: int, prefix: str):
        for k, v in node.items():
            key = f"{prefix}{k}"
            pad = "  " * indent
            if isinstance(v, dict) and v and k not in ATOMIC_KEYS:
                src = sources.get(key)
                lines.append(f"{pad}{k}:" + (f"  # {src}" if src else ""))
                emit(v, indent + 1, key + ".")
            else:
                src = sources.get(key)
                lines.append(f"{pad}{k}: {_flow(v)}" + (f"  # {src}" if src else ""))

    emit(to_dict(cfg), 0, "")
    path.write_text("\n".join(lines) + "\n")


def _flow(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-3].strip() if text.endswith("...") else text


def load_resolved(path: Path) -> RunConfig:
    data = yaml.safe_load(Path(path).read_text())
    cfg = from_dict(RunConfig, data, where=str(path))
    validate(cfg)
    return cfg
