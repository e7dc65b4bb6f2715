"""The typed run configuration: dataclasses, and the strict mapping <-> dataclass conversion.

One run is one `RunConfig`. `from_dict` builds it from plain mappings (YAML) and refuses
an unknown key or a value of the wrong type with the key's full path and a suggestion;
`to_dict` turns it back; `load_yaml` / `read_yaml` read the YAML those mappings come from
(a malformed or unreadable file is a ConfigError naming it). stdlib + yaml only: which
names exist (connectors, templates, benchmarks ...) is the registries' business, asked by
`tinylmm.config.validate`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tinylmm.errors import ConfigError, did_you_mean


@dataclass
class LLMSpec:
    name_or_path: str | None = None  # hub id or local directory (weights loaded from there)
    config: dict | None = None  # inline architecture config: random init (toy preset, tests)
    tokenizer: str | None = None  # hub id / directory / "builtin:toy"; default: name_or_path
    # run the Python code a hub model ships for its own architecture (its config's auto_map),
    # for the LLM and its tokenizer. That code runs with your rights: only for repositories
    # you trust. Off: such a model is refused with an error naming this key.
    trust_remote_code: bool = False


BUILTIN_PREFIX = "builtin"  # `builtin:<name>`: a model shipped in tinylmm/assets/ (models/loading.py)


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

    @property
    def backend(self) -> str:
        """The vision backend that builds the tower (tinylmm/models/vision/): the prefix of a
        `<backend>:<model>` name (`open_clip:ViT-L-14`), else `transformers` (which also loads
        the `builtin:` towers shipped in the package). The one rule that tells them apart, for
        specs, saved checkpoints and the planner alike."""
        prefix, sep, _ = (self.name_or_path or "").partition(":")
        if prefix == BUILTIN_PREFIX:
            return "transformers"
        return prefix if sep and len(prefix) > 1 and prefix.replace("_", "").isalnum() else "transformers"

    @property
    def model_name(self) -> str:
        """name_or_path without its backend prefix."""
        name = self.name_or_path or ""
        return name.split(":", 1)[1] if self.backend != "transformers" else name


class ConnectorSpec:
    """`type` names an entry of the connector registry (tinylmm/models/connectors/); every
    other key is one of that connector's own options, checked against the option dataclass
    the connector declares when the config is validated (`tinylmm.config.validate`). In YAML
    the section stays flat: `connector: {type: resampler, num_queries: 64}`."""

    def __init__(self, type: str = "mlp2x_gelu", **options):
        self.type = type
        self.options = options

    @classmethod
    def from_mapping(cls, data: dict, where: str) -> ConnectorSpec:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {data!r}")
        data = dict(data)
        kind = data.pop("type", "mlp2x_gelu")
        if not isinstance(kind, str):
            raise ConfigError(f"{where}.type: expected a connector name, got {kind!r}")
        return cls(kind, **{str(k): v for k, v in data.items()})

    def to_mapping(self) -> dict:
        return {"type": self.type, **self.options}

    def __eq__(self, other) -> bool:
        return isinstance(other, ConnectorSpec) and self.to_mapping() == other.to_mapping()

    def __repr__(self) -> str:
        return f"ConnectorSpec({', '.join(f'{k}={v!r}' for k, v in self.to_mapping().items())})"


@dataclass
class ModelSpec:
    llm: LLMSpec = field(default_factory=LLMSpec)
    vision: VisionSpec = field(default_factory=VisionSpec)
    connector: ConnectorSpec = field(default_factory=ConnectorSpec)
    template: str = "phi"  # conversation format of the instruction stages
    seed: int = 0  # initialisation of randomly initialised parts (connector, toy models)


@dataclass
class DatasetSpec:
    """One dataset of a stage's mixture (`data.datasets`)."""

    json: str
    images: str | None = None
    task: str | None = None  # the tag `balance: per-task` balances over
    weight: float | None = None  # `balance: weights` only
    max_samples: int | None = None  # keep this many of its samples (a seeded choice)
    instructize: dict | None = None  # as DataSpec.instructize


@dataclass
class DataSpec:
    """Where a stage's samples come from: a LLaVA-format JSON, a split of `shapes`, or a
    mixture of several datasets balanced as Honeybee does (tinylmm/data/mixture.py)."""

    json: str | None = None
    images: str | None = None  # image folder the JSON's relative `image` paths start from
    shapes: Literal["caption", "instruct"] | None = None
    # records that are not conversations (VQA, multiple choice, captions, boxes) turned into
    # them first: the options of tinylmm/data/instructize.py's InstructOptions, `task` first
    instructize: dict | None = None
    datasets: list[DatasetSpec] | None = None
    balance: Literal["per-dataset", "per-task", "per-sample", "weights"] | None = None
    cap: int | None = None  # `balance: per-sample`: each dataset's size capped at this


@dataclass
class StageConfig:
    data: DataSpec = field(default_factory=DataSpec)
    template: str | None = None  # None: the model's template; "pretrain" for caption alignment
    # per component: frozen | full | partial:<first trainable layer> (N, -N from the end, or P%)
    # | lora (LLM or vision: adapters on a frozen base) | qlora (LLM: adapters on a 4-bit base)
    tune: dict[str, str] = field(default_factory=lambda: {"vision": "frozen", "connector": "full", "llm": "frozen"})
    lr: float = 2e-5  # every component's learning rate, unless it has its own below
    llm_lr: float | None = None  # own rate for the LLM (`--tune lora|qlora` sets lora.lr here)
    connector_lr: float | None = None  # own rate for the connector (None: lr)
    vision_lr: float | None = None  # own rate for the vision tower (None: lr)
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
    n_pope: int = 16  # images of the POPE splits (3 present + 3 absent objects each, per split)
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
    # the dtype the packed 4-bit weights are stored in (bitsandbytes' quant_storage): auto is
    # the compute dtype under FSDP (which shards only float tensors of one dtype) and uint8,
    # bitsandbytes' default, otherwise; the stored 4-bit values are the same either way
    storage_dtype: Literal["auto", "uint8", "bf16", "fp16", "fp32"] = "auto"


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")


@dataclass
class TrainConfig:
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # adamw: torch; *_8bit: bitsandbytes 8-bit states (2 bytes/param instead of 8);
    # paged_*: bitsandbytes states in CUDA unified memory (evicted to RAM under pressure)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    gradient_checkpointing: bool = False
    # the LM head + loss over the supervised positions, this many at a time (0: all at
    # once, one logits tensor); torch: chunked in torch on any device; liger: Liger-Kernel's
    # fused linear cross-entropy (CUDA, plain heads); auto: liger where it can run
    loss_chunk: int = 1024
    loss_kernel: Literal["auto", "torch", "liger"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    num_workers: int = 0
    seed: int = 0  # data order
    # steps in a row with a non-finite loss or gradient norm (each makes no update) before
    # the run stops with an error, without writing the stage's final/
    max_bad_steps: int = 3
    # each micro-batch's samples end to end in one row, attention confined to each sample
    # (tinylmm.data.packing); off by default: the default run's measured results stay as they are
    packing: bool = False
    # LLaVA's group_by_modality_length: image and text-only samples in separate steps, each
    # step's micro-batches bands of similar length (tinylmm.train.grouping)
    group_by_modality_length: bool = False


@dataclass
class DataConfig:
    """Run-level data settings (tinylmm.data.check): what `train` checks at its start, and how
    many images that fail while training it replaces before it stops."""

    verify_images: bool = False  # decode every image at the start (existence is always checked)
    # images that fail to decode while training, each replaced by another sample, before the run
    # saves a checkpoint and stops: a count, or a fraction of the stage's samples when below 1
    max_bad_images: float = 0.001
    # accept `image` paths that leave the image folder (`../x.png`, absolute paths)
    allow_outside_paths: bool = False
    # keep tokenized datasets in $TINYLMM_CACHE (default ~/.cache/tinylmm), reused by later runs,
    # resumes and every process (tinylmm.data.token_cache); false: tokenize for this run alone
    cache: bool = True
    num_proc: int | None = None  # processes that tokenize a dataset on a cache miss (None: the CPUs)


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
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys whose value replaces the previous layer's as a whole instead of merging into it:
# a stage that reads `{shapes: caption}` must not inherit the recipe's `json:` path.
ATOMIC_KEYS = {"data", "config"}


def is_atomic(path: list[str]) -> bool:
    """Whether the section at `path` is replaced as a whole (ATOMIC_KEYS below the top: the
    run-level `data:` settings merge key by key like every other top-level section)."""
    return len(path) > 1 and path[-1] in ATOMIC_KEYS


COMPONENTS = ("vision", "connector", "llm")


# --------------------------------------------------------------------------- YAML in


def load_yaml(text: str, where: str):
    """YAML text (a recipe, a zoo file, an override's value) as plain data; malformed YAML
    and an alias inside its own anchor (`&a [*a]`: a structure that contains itself) are
    ConfigErrors naming `where`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({e})") from None
    _refuse_cycles(data, where)
    return data


def read_yaml(path: Path, where: str | None = None):
    """A YAML file's data; a file that cannot be read or is not UTF-8 is a ConfigError naming it."""
    where = where or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: file does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # a directory, no permission ...
        raise ConfigError(f"{where}: cannot be read ({e.strerror or e})") from None
    return text, load_yaml(text, where)


def _refuse_cycles(data, where: str) -> None:
    # iterative, each container once: aliases may share a node many times without a cycle
    done: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    open_: set[int] = set()
    while stack:
        node, leaving = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if leaving:
            open_.discard(id(node))
            done.add(id(node))
            continue
        if id(node) in open_:
            raise ConfigError(f"{where}: a YAML alias refers to its own anchor (the value would contain itself)")
        if id(node) in done:
            continue
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in (node.values() if isinstance(node, dict) else node))


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
    if hasattr(tp, "from_mapping"):  # a section whose keys depend on a registry entry (ConnectorSpec)
        return tp.from_mapping(value, where)
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
        try:
            return float(value)
        except OverflowError:  # an integer past float's range (YAML reads 1000...0 as an int)
            raise ConfigError(f"{where}: {value} is too large for a number") from None
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
    if hasattr(obj, "to_mapping"):
        return to_dict(obj.to_mapping())
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj
