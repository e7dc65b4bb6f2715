"""The model zoo: named presets read from model_zoo.yaml, and presets a user registers.

    get(name)            a Preset (unknown name: an error with a suggestion)
    register(path)       add the presets of a YAML file of the same schema
    shipped_counts(p)    a shipped preset's parameter counts, as recorded in the package

What a preset amounts to (its model built on the meta device, its memory plan) is
`tinylmm.api.zoo_describe`; listing with counts is `tinylmm.api.zoo_select`.

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

from tinylmm.catalog import recipes
from tinylmm.catalog.families import LLM_FAMILIES, VISION_FAMILIES
from tinylmm.errors import ConfigError, did_you_mean, unknown
from tinylmm.resources import asset, resource
from tinylmm.schema import ModelSpec, RunConfig, StageConfig, from_dict, read_yaml, to_dict

SHIPPED = "model_zoo.yaml"
COUNTS = "zoo_counts.json"  # tinylmm/assets/: every shipped preset's counts (scripts/update_zoo_counts.py)


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

    family: str | None = None  # the LLM's: an entry of catalog.families.LLM_FAMILIES
    vision_family: str | None = None  # an entry of VISION_FAMILIES
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
    run: dict = field(default_factory=dict)  # YAML `run:`: other RunConfig sections (shapes, eval ...)
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
    for key, kind in (("description", str), ("stage_defaults", dict), ("run", dict)):
        if entry.get(key) is not None and not isinstance(entry[key], kind):
            raise ConfigError(f"{where}.{key}: expected {'a mapping' if kind is dict else 'text'}, got {entry[key]!r}")
    info = from_dict(PresetInfo, {k: v for k, v in entry.items() if k in PresetInfo.__dataclass_fields__}, where)
    if source == SHIPPED:
        missing = [k for k in REQUIRED_SHIPPED if entry.get(k) is None]
        if missing:
            raise ConfigError(f"{where}: shipped presets state {', '.join(missing)}")
    for key, families in (("family", LLM_FAMILIES), ("vision_family", VISION_FAMILIES)):
        value = getattr(info, key)
        if value is not None and value not in families:
            raise ConfigError(
                f"{where}.{key}: '{value}' is not one of {families.names()}{did_you_mean(value, families.names())}"
            )
    if info.scores and not info.scores_source:
        raise ConfigError(f"{where}: scores need a 'scores_source' (where they are reported, for which recipe)")
    if info.recommended is not None and info.recommended.recipe not in recipes.shipped():
        raise unknown(f"recipe in {where}.recommended.recipe", info.recommended.recipe, recipes.shipped())
    preset = Preset(
        name=str(name),
        description=entry.get("description") or "",
        model=entry["model"],
        stage_defaults=entry.get("stage_defaults", {}) or {},
        run=entry.get("run", {}) or {},
        info=info,
        source=source,
    )
    # Check every key now, so a typo in the zoo fails at load time, not mid-run.
    preset.model_spec()
    for stage, values in preset.stage_defaults.items():
        from_dict(StageConfig, values, f"{where}.stage_defaults.{stage}")
    from_dict(RunConfig, dict(preset.run), f"{where}.run")
    return preset


def _read(path: Path, source: str) -> dict[str, Preset]:
    _, raw = read_yaml(path, source)
    raw = {} if raw is None else raw
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
            raise ConfigError(
                f"{path}: preset '{name}' is a shipped preset; give yours another name "
                f"(runs record their preset by name)"
            )
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


def size_label(total: int) -> str:
    """TinyLLaVA's names give the total truncated to 0.1B (3.19B: "3.1b")."""
    return f"{math.floor(total / 1e8) / 10:.1f}b"


def parse_count(text: str) -> int:
    """A parameter count: 2B, 1.5b, 800M, 3e9."""
    t = str(text).strip().lower()
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale != 1 else t) * scale)
    except ValueError:
        raise ConfigError(f"'{text}' is not a parameter count (e.g. 2B, 1.5B, 800M)") from None


@functools.cache
def _counts() -> dict:
    path = asset(COUNTS)
    return json.loads(path.read_text()) if path.exists() else {}


def model_key(spec: ModelSpec) -> str:
    """The model spec as canonical JSON: what recorded counts are keyed by."""
    return json.dumps(to_dict(spec), sort_keys=True)


def shipped_counts(preset: Preset) -> dict | None:
    """The parameter counts and visual tokens recorded for a shipped preset
    (tinylmm/assets/zoo_counts.json), or None where the preset is not shipped or its model
    spec changed since they were recorded: then they must be computed (tinylmm.api)."""
    if not preset.shipped:
        return None
    entry = _counts().get(preset.name)
    if entry is None or entry["model"] != to_dict(preset.model_spec()):
        return None
    return entry
