"""The model zoo: named presets read from model_zoo.yaml."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import yaml

from tinylmm.config import ConfigError, ModelSpec, RunConfig, StageConfig, did_you_mean, from_dict, unknown
from tinylmm.resources import resource

ENTRY_KEYS = ("description", "model", "stage_defaults", "run")


@dataclass
class Preset:
    name: str
    description: str
    model: dict  # a ModelSpec mapping
    stage_defaults: dict[str, dict] = field(default_factory=dict)  # per stage name
    settings: dict = field(default_factory=dict)  # other RunConfig sections (shapes, eval ...)

    def model_spec(self) -> ModelSpec:
        return from_dict(ModelSpec, self.model, f"model_zoo.yaml:{self.name}.model")


def _parse(name: str, entry: dict) -> Preset:
    where = f"model_zoo.yaml:{name}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping")
    for key in entry:
        if key not in ENTRY_KEYS:
            raise ConfigError(f"unknown key '{where}.{key}'{did_you_mean(key, ENTRY_KEYS)}")
    preset = Preset(
        name=name,
        description=entry.get("description", ""),
        model=entry.get("model", {}),
        stage_defaults=entry.get("stage_defaults", {}) or {},
        settings=entry.get("run", {}) or {},
    )
    # Check every key now, so a typo in the zoo fails at load time, not mid-run.
    preset.model_spec()
    for stage, values in preset.stage_defaults.items():
        from_dict(StageConfig, values, f"{where}.stage_defaults.{stage}")
    from_dict(RunConfig, dict(preset.settings), f"{where}.run")
    return preset


@functools.cache
def presets() -> dict[str, Preset]:
    raw = yaml.safe_load(resource("model_zoo.yaml").read_text()) or {}
    return {name: _parse(name, entry) for name, entry in raw.items()}


def names() -> list[str]:
    return list(presets())


def get(name: str) -> Preset:
    table = presets()
    if name not in table:
        raise unknown("preset", name, table)
    return table[name]
