"""The model zoo: named presets read from model_zoo.yaml, and presets a user registers.

    get(name)            a Preset (unknown name: an error with a suggestion)
    build(name, ...)     (model, processor) of a preset, with key=value overrides
    register(path)       add the presets of a YAML file of the same schema
    stats(name)          parameter counts and visual tokens, from the embedded configs
    describe(name)       everything `tinylmm zoo show` prints, a memory plan included

A user's file can add presets but not redefine a shipped one: a run records its preset by
name (runs/<preset>-..., the saved config), and a name must keep meaning the same model.
Registering the same file again replaces what it registered before; two different files
cannot register the same name.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from tinylmm.config import ConfigError, ModelSpec, RunConfig, StageConfig, did_you_mean, from_dict, unknown
from tinylmm.resources import resource

SHIPPED = "model_zoo.yaml"
LLM_FAMILIES = ("phi2", "stablelm2", "tinyllama", "qwen2.5", "qwen3", "smollm2", "llama3.2", "gemma2", "toy",
                "other")
VISION_FAMILIES = ("siglip", "siglip2", "clip", "dinov2", "open_clip", "toy", "other")


@dataclass
class Recommended:
    """The recipe and `--tune` mode to start from: the best that fits one 24 GB GPU per
    `tinylmm plan` (share before base; full before lora before qlora)."""

    recipe: str = "share"
    tune: Literal["full", "lora", "qlora"] = "full"


@dataclass
class PresetInfo:
    """What a preset says about itself beyond the model (model_zoo.yaml requires all of it
    but scores; a user's file may leave it out)."""

    family: Literal["phi2", "stablelm2", "tinyllama", "qwen2.5", "qwen3", "smollm2", "llama3.2", "gemma2",
                    "toy", "other"] | None = None  # the LLM's
    vision_family: Literal["siglip", "siglip2", "clip", "dinov2", "open_clip", "toy", "other"] | None = None
    licence: str | None = None  # the LLM's and the vision tower's, short
    gated: bool = False  # a hub repo needs an accepted licence and a token
    commercial: bool | None = None  # commercial use allowed without a separate agreement
    recommended: Recommended | None = None
    scores: dict[str, float] = field(default_factory=dict)  # benchmark -> reported score
    scores_source: str | None = None  # where the scores are reported (and for which recipe)


ENTRY_KEYS = ("description", "model", "stage_defaults", "run") + tuple(PresetInfo.__dataclass_fields__)
REQUIRED_SHIPPED = ("family", "vision_family", "licence", "commercial", "recommended")


@dataclass
class Preset:
    name: str
    description: str
    model: dict  # a ModelSpec mapping
    stage_defaults: dict[str, dict] = field(default_factory=dict)  # per stage name
    settings: dict = field(default_factory=dict)  # other RunConfig sections (shapes, eval ...)
    info: PresetInfo = field(default_factory=PresetInfo)
    source: str = SHIPPED  # the file that defines it

    def model_spec(self) -> ModelSpec:
        return from_dict(ModelSpec, self.model, f"{self.source}:{self.name}.model")

    @property
    def shipped(self) -> bool:
        return self.source == SHIPPED


def _parse(name: str, entry: dict, source: str = SHIPPED) -> Preset:
    where = f"{source}:{name}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping")
    for key in entry:
        if key not in ENTRY_KEYS:
            raise ConfigError(f"unknown key '{where}.{key}'{did_you_mean(key, ENTRY_KEYS)}")
    if "model" not in entry:
        raise ConfigError(f"{where}: a preset needs a 'model' (llm, vision, connector, template)")
    info = from_dict(PresetInfo, {k: v for k, v in entry.items() if k in PresetInfo.__dataclass_fields__}, where)
    if source == SHIPPED:
        missing = [k for k in REQUIRED_SHIPPED if entry.get(k) is None]
        if missing:
            raise ConfigError(f"{where}: shipped presets state {', '.join(missing)}")
    if info.scores and not info.scores_source:
        raise ConfigError(f"{where}: scores need a 'scores_source' (where they are reported, for which recipe)")
    if info.recommended is not None:
        from tinylmm.recipes import shipped

        if info.recommended.recipe not in shipped():
            raise unknown(f"recipe in {where}.recommended.recipe", info.recommended.recipe, shipped())
    preset = Preset(
        name=str(name),
        description=entry.get("description", ""),
        model=entry["model"],
        stage_defaults=entry.get("stage_defaults", {}) or {},
        settings=entry.get("run", {}) or {},
        info=info,
        source=source,
    )
    # Check every key now, so a typo in the zoo fails at load time, not mid-run.
    preset.model_spec()
    for stage, values in preset.stage_defaults.items():
        from_dict(StageConfig, values, f"{where}.stage_defaults.{stage}")
    from_dict(RunConfig, dict(preset.settings), f"{where}.run")
    return preset


def _read(path: Path, source: str) -> dict[str, Preset]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of preset name -> entry")
    return {str(name): _parse(str(name), entry, source) for name, entry in raw.items()}


@functools.cache
def _shipped() -> dict[str, Preset]:
    return _read(resource(SHIPPED), SHIPPED)


_registered: dict[str, Preset] = {}  # name -> preset, from users' files


def presets() -> dict[str, Preset]:
    """Every preset: the shipped ones (read once), then the registered ones."""
    return {**_shipped(), **_registered}


def names() -> list[str]:
    return list(presets())


def get(name: str) -> Preset:
    table = presets()
    if name not in table:
        raise unknown("preset", name, table)
    return table[name]


def register(path: str | Path) -> list[str]:
    """Add the presets of a user's YAML file (model_zoo.yaml's schema). The whole file is
    checked first: a bad file registers nothing. Returns the names it registered."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"zoo file '{path}' does not exist")
    source = str(path.resolve())
    new = _read(path, str(path))
    for name in new:
        if name in _shipped():
            raise ConfigError(f"{path}: preset '{name}' is a shipped preset; give yours another name "
                              f"(runs record their preset by name)")
        other = _registered.get(name)
        if other is not None and other.source != source:
            raise ConfigError(f"{path}: preset '{name}' is already registered from {other.source}")
    for name in [n for n, p in _registered.items() if p.source == source]:
        del _registered[name]  # registering a file again replaces its own presets
    for name, preset in new.items():
        preset.source = source
        _registered[name] = preset
    return list(new)


def unregister(path: str | Path | None = None) -> None:
    """Forget the presets registered from `path` (every registered preset without one)."""
    source = None if path is None else str(Path(path).expanduser().resolve())
    for name in [n for n, p in _registered.items() if source is None or p.source == source]:
        del _registered[name]


def build(name: str, overrides=(), **kwargs):
    """(model, processor) of a preset, pretrained parts loaded, others initialised at random.
    `overrides`: key=value on the model spec, with or without the `model.` prefix
    (`connector.type=linear`, `model.vision.feature_layer=-1`). `kwargs` go to
    models.lmm.build_model (dtype, attn_implementation ...)."""
    from tinylmm.config import resolve
    from tinylmm.models.lmm import build_model

    get(name)  # an unknown name fails here, with a suggestion
    keys = [o if o.split("=", 1)[0].strip().startswith("model.") else f"model.{o}" for o in overrides]
    cfg, _ = resolve(name, "share", keys)  # the recipe does not touch the model
    return build_model(cfg.model, **kwargs)


# --------------------------------------------------------------------------- what a preset amounts to


def size_label(total: int) -> str:
    """TinyLLaVA's names give the total truncated to 0.1B (3.19B: "3.1b")."""
    return f"{math.floor(total / 1e8) / 10:.1f}b"


@dataclass
class Stats:
    """A preset's model built on the meta device: parameters per part, as tinylmm builds it
    (the tower cut at its feature layer, the embedding grown for <image>)."""

    llm: int
    vision: int  # the tower as cut at its feature layer
    vision_full: int  # the published tower, every layer and head
    connector: int
    num_image_tokens: int  # per image, in the LLM sequence
    image_size: int
    patch_size: int
    image_mean: list[float]
    image_std: list[float]
    pad_to_square: bool
    resize: str  # how the (padded) image is brought to image_size: squash, shortest ... (ImageProcessor)
    llm_model_type: str
    vision_model_type: str
    notes: list[str]

    @property
    def total(self) -> int:
        return self.llm + self.vision + self.connector


def stats(name: str) -> Stats:
    from tinylmm.config import to_dict

    return _stats(json.dumps(to_dict(get(name).model_spec()), sort_keys=True))


@functools.lru_cache(maxsize=64)
def _stats(spec_json: str) -> Stats:
    from tinylmm.models.lmm import image_processor_for
    from tinylmm.models.openclip import is_openclip, visual_parameter_count
    from tinylmm.train.memory import arch_config, build_meta, count_vision_parameters

    spec = from_dict(ModelSpec, json.loads(spec_json))
    meta = build_meta(spec)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    if is_openclip(spec.vision):  # open_clip ships its model configs
        uncut = visual_parameter_count(spec.vision.name_or_path.split(":", 1)[1])
        vision_type, patch = f"open_clip:{meta.vision_config.model_name}", meta.vision.patch_size
    else:
        uncut = count_vision_parameters(arch_config(spec.vision, "vision"))
        vision_type, patch = meta.vision_config.model_type, meta.vision_config.patch_size
    images = image_processor_for(spec.vision, meta.vision)
    return Stats(count(meta.llm), count(meta.vision), uncut, count(meta.connector), meta.num_image_tokens,
                 images.size, patch, list(images.image_mean), list(images.image_std), images.pad_to_square,
                 images.resize, meta.llm_config.model_type, vision_type, list(meta.notes))


def row(name: str) -> dict:
    """One line of `tinylmm zoo ls`. A preset whose tower needs open_clip, where it is not
    installed, is listed without its counts (`unavailable` says why)."""
    from tinylmm.models.openclip import OpenCLIPMissing

    p = get(name)
    try:
        s, missing = stats(name), None
    except OpenCLIPMissing as e:
        s, missing = None, str(e)
    spec = p.model_spec()
    rec = p.info.recommended
    return {"name": p.name, "family": p.info.family, "vision_family": p.info.vision_family,
            "llm": spec.llm.name_or_path or "(inline config)", "vision": spec.vision.name_or_path or "(inline config)",
            "params": s and s.total, "visual_tokens": s and s.num_image_tokens, "unavailable": missing,
            "template": spec.template,
            "licence": p.info.licence, "gated": p.info.gated, "commercial": p.info.commercial,
            "recipe": rec.recipe if rec else None, "tune": rec.tune if rec else None,
            "source": p.source, "description": p.description}


def parse_count(text: str) -> int:
    """A parameter count: 2B, 1.5b, 800M, 3e9."""
    t = str(text).strip().lower()
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale != 1 else t) * scale)
    except ValueError:
        raise ConfigError(f"'{text}' is not a parameter count (e.g. 2B, 1.5B, 800M)") from None


def select(*, family: str | None = None, vision: str | None = None, max_params: int | None = None,
           template: str | None = None, commercial: bool | None = None, gated: bool | None = None) -> list[dict]:
    """The rows of `tinylmm zoo ls` that pass every filter given."""
    if family is not None and family not in LLM_FAMILIES:
        raise unknown("LLM family", family, LLM_FAMILIES)
    if vision is not None and vision not in VISION_FAMILIES:
        raise unknown("vision family", vision, VISION_FAMILIES)
    out = []
    for name in names():
        r = row(name)
        if ((family is None or r["family"] == family) and (vision is None or r["vision_family"] == vision)
                and (max_params is None or (r["params"] is not None and r["params"] <= max_params))
                and (template is None or r["template"] == template)
                and (commercial is None or r["commercial"] is commercial)
                and (gated is None or r["gated"] is gated)):
            out.append(r)
    return out


def plan_summary(name: str, budget_bytes: int | None = None) -> dict | None:
    """The memory plan of the preset's recommended recipe and tune (one GPU, bf16)."""
    from tinylmm.config import resolve
    from tinylmm.train.memory import DEFAULT_BUDGET, plan_run

    rec = get(name).info.recommended
    if rec is None:
        return None
    cfg, _ = resolve(name, rec.recipe, tune=rec.tune)
    plan = plan_run(cfg, budget_bytes=budget_bytes or DEFAULT_BUDGET)
    return {"recipe": rec.recipe, "tune": rec.tune, "budget": plan.budget, "fits": plan.fits,
            "stages": [{"name": s.name, "tune": s.tune, "peak": s.total, "fits": s.fits, "micro_batch": s.micro_batch,
                        "max_micro_batch": s.max_micro_batch, "seq_len": s.seq_len} for s in plan.stages],
            "notes": plan.notes}


def describe(name: str, budget_bytes: int | None = None, plan: bool = True) -> dict:
    """Everything about a preset: its entry, parameters per part, image input, licence,
    scores and (plan=True) the memory plan of its recommended recipe."""
    from dataclasses import asdict

    p, s = get(name), stats(name)
    return {"name": p.name, "description": p.description, "source": p.source, **asdict(p.info),
            "model": p.model, "stage_defaults": p.stage_defaults, "run": p.settings,
            "params": {"llm": s.llm, "vision": s.vision, "vision_full": s.vision_full, "connector": s.connector,
                       "total": s.total},
            "visual_tokens": s.num_image_tokens,
            "image": {"size": s.image_size, "patch_size": s.patch_size, "mean": s.image_mean, "std": s.image_std,
                      "pad_to_square": s.pad_to_square, "resize": s.resize},
            "model_types": {"llm": s.llm_model_type, "vision": s.vision_model_type},
            "notes": s.notes,
            "plan": plan_summary(name, budget_bytes) if plan else None}
