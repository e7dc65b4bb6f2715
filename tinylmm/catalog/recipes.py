"""Recipes: ordered training stages, as YAML data (recipes/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tinylmm.errors import ConfigError, unknown
from tinylmm.files import copy_new
from tinylmm.resources import resource
from tinylmm.schema import RunConfig, StageConfig, from_dict, read_yaml


@dataclass
class Recipe:
    name: str
    path: Path
    description: str
    stages: dict[str, dict]  # stage name -> StageConfig mapping, in order
    run: dict  # the other RunConfig sections the recipe sets (its top-level keys but `stages`)
    shipped: bool = False  # one of recipes/*.yaml (not a user's file)


def shipped() -> dict[str, Path]:
    return {p.stem: p for p in sorted(resource("recipes").glob("*.yaml"))}


def _description(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name (`share`), or a YAML file of the same form."""
    path = Path(name_or_path)
    shipped_recipe = False
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        table = shipped()
        if name_or_path not in table:
            if path.suffix in (".yaml", ".yml"):
                raise ConfigError(f"recipe file '{name_or_path}' does not exist")
            raise unknown("recipe", name_or_path, table)
        path = table[name_or_path]
        shipped_recipe = True
    where = str(path)
    text, data = read_yaml(path, where)
    if data is None:
        data = {}
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict) or not data["stages"]:
        raise ConfigError(f"{where}: a recipe needs a 'stages' mapping (stage name -> settings)")
    # stage names are what overrides address (stages.<name>.lr=...): strings, as YAML `1:` reads
    # an int; an empty stage (`share:`) takes the defaults
    stages = {str(name): {} if values is None else values for name, values in data["stages"].items()}
    if len(stages) != len(data["stages"]):
        raise ConfigError(f"{where}: two stages have the same name ({', '.join(map(repr, data['stages']))})")
    for stage, values in stages.items():
        from_dict(StageConfig, values, f"{where}:stages.{stage}")
    run = {k: v for k, v in data.items() if k != "stages"}
    from_dict(RunConfig, dict(run), where)
    return Recipe(path.stem, path, _description(text), stages, run, shipped_recipe)


def copy_recipe(name: str, dest: str | Path) -> Path:
    """Copy a shipped recipe to `dest` for editing; never overwrites."""
    return copy_new(load_recipe(name).path, dest)
