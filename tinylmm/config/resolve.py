"""Resolution: one typed `RunConfig` from layers applied in this order:

    defaults (the dataclasses of tinylmm.schema)
      <- preset  (model_zoo.yaml: the model, plus `stage_defaults` for small presets)
      <- recipe  (a shipped recipes/*.yaml, or a user's recipe file)
      <- preset stage_defaults (per stage name, e.g. the toy preset's short schedule;
         shipped recipes only: a user's recipe file is taken as written)
      <- preset `run:` sections
      <- --llm / --vision, user overrides (`key=value`, dotted; stages are addressed by name)
      <- --tune full|lora|qlora (`--tune auto`, which plans for a device, is
         tinylmm.config.tune_auto's, on top of this)

Every key is checked against the schema here (an unknown key is an error with a
suggestion); names that registries own (connectors, templates, benchmarks ...) are checked
by `tinylmm.config.validate`. Nothing here imports a model, data or training module.
"""

from __future__ import annotations

from tinylmm.catalog import zoo
from tinylmm.catalog.recipes import load_recipe
from tinylmm.config.layers import Layers, parse_override
from tinylmm.errors import ConfigError, unknown
from tinylmm.schema import RunConfig, VisionSpec, from_dict, to_dict

TUNE_SWITCHES = ("full", "lora", "qlora")
# `auto`: per stage, the first of full, lora, qlora that fits the device (config/tune_auto.py)
TUNE_CHOICES = ("auto", *TUNE_SWITCHES)


def layer_config(
    preset: str = "toy",
    recipe: str = "share",
    overrides: list[str] | tuple[str, ...] = (),
    *,
    output_dir: str | None = None,
    tune: str | None = None,
    llm: str | None = None,
    vision: str | None = None,
) -> tuple[RunConfig, dict[str, str]]:
    """The layered, schema-checked config and, per dotted key, the layer that set it.
    `llm` / `vision` (the `--llm PATH` / `--vision PATH` flags) load that part of the preset
    from a local directory or another hub id; `key=value` overrides still win."""
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
    layers.apply(r.run, f"recipe:{r.name}")
    layers.apply({"stages": r.stages}, f"recipe:{r.name}")
    # A preset's stage defaults adapt the *shipped* recipes to it (the toy's CPU schedule on
    # the shapes data). A recipe file of the user's is taken as written.
    if r.shipped:
        for stage, values in p.stage_defaults.items():
            if stage in r.stages:  # a preset may tune stages the chosen recipe does not have
                layers.apply(values, f"preset:{p.name}", ("stages", stage))
    layers.apply(p.run, f"preset:{p.name}")
    # The weights come from PATH, so the preset's inline architecture (if any) no longer
    # applies; an LLM directory holds its tokenizer too.
    if llm is not None:
        layers.set(["model", "llm"], {"name_or_path": str(llm), "tokenizer": str(llm), "config": None}, "cli --llm")
    if vision is not None:
        current = VisionSpec(name_or_path=(layers.data["model"].get("vision") or {}).get("name_or_path"))
        if current.backend != "transformers":
            # a `<backend>:<model>` tower keeps its architecture; its weights come from PATH
            layers.set(["model", "vision", "pretrained"], str(vision), "cli --vision")
        else:
            layers.set(["model", "vision", "name_or_path"], str(vision), "cli --vision")
            layers.set(["model", "vision", "config"], None, "cli --vision")
    for path, value in parsed:
        if path in (["preset"], ["recipe"]):
            continue
        if path[0] == "stages" and len(path) >= 2 and path[1] not in r.stages:
            raise unknown("stage in override", path[1], r.stages)
        layers.set(path, value, "override")
    if tune is not None:
        from_dict(RunConfig, layers.data)  # the switch reads the stages: a mistyped key fails here, named
        apply_tune_switch(layers, tune)
    if output_dir is not None:
        layers.set(["output_dir"], output_dir, "cli")
    return from_dict(RunConfig, layers.data), layers.sources


def apply_tune_switch(layers: Layers, mode: str) -> None:
    """`--tune lora|qlora`: every stage that trains the LLM (full or partial) trains it with
    adapters instead, at `lora.lr` (TinyLLaVA: 2e-4) as the stage's `llm_lr`, while the
    connector and the vision tower keep the stage's `lr` (as LLaVA-1.5's LoRA script:
    mm_projector_lr 2e-5). `lr` keeps its meaning: every component's rate but those with
    their own. Values the user set with an override are kept. `--tune full` leaves the
    recipe as is."""
    if mode == "auto":  # it plans for a device: above this registry-free module
        raise ConfigError("--tune auto is chosen by tinylmm.config.tune_auto (tinylmm.api.resolve_config does)")
    if mode not in TUNE_SWITCHES:
        raise unknown("--tune mode", mode, TUNE_CHOICES)
    if mode == "full":
        return
    for name, st in layers.data.get("stages", {}).items():
        if trains_llm_weights(str(st.get("tune", {}).get("llm", "frozen"))):
            if not layers.set_by(["stages", name, "tune", "llm"], "override"):
                switch_stage_llm(layers, name, mode, f"--tune {mode}")


def trains_llm_weights(mode: str) -> bool:
    return mode == "full" or mode.startswith("partial:")


def switch_stage_llm(layers: Layers, stage: str, mode: str, source: str) -> None:
    """One stage's LLM to `mode`. Weights trained in full or in part that become adapters
    take `lora.lr` as the stage's `llm_lr` (unless the user set it); lora -> qlora keeps
    the stage's rates."""
    st = layers.data["stages"][stage]
    was = str(st.get("tune", {}).get("llm", "frozen"))
    layers.set(["stages", stage, "tune", "llm"], mode, source)
    if mode in ("lora", "qlora") and trains_llm_weights(was):
        if not layers.set_by(["stages", stage, "llm_lr"], "override"):
            layers.set(["stages", stage, "llm_lr"], float(layers.data.get("lora", {}).get("lr", 2e-4)), source)


def retune_stage(
    cfg: RunConfig, sources: dict[str, str], stage: str, *, llm: str, micro_batch: int, source: str
) -> tuple[RunConfig, dict[str, str]]:
    """`cfg` with one stage's LLM mode and micro-batch changed by `source` (`--tune auto`),
    by the rules of `--tune`; values that did not change keep the layer that set them."""
    layers = Layers()
    layers.data, layers.sources = to_dict(cfg), dict(sources)
    if llm != cfg.stages[stage].tune["llm"]:
        switch_stage_llm(layers, stage, llm, source)
    if micro_batch != cfg.stages[stage].micro_batch_size:
        layers.set(["stages", stage, "micro_batch_size"], micro_batch, source)
    return from_dict(RunConfig, layers.data), layers.sources


def from_saved(config: RunConfig, name: str, overrides=()) -> tuple[RunConfig, dict[str, str]]:
    """A saved run's config as the bottom layer of a new run (a new output directory unless
    one is given), with `key=value` overrides on top."""
    saved = to_dict(config)
    saved["output_dir"] = None
    layers = Layers()
    layers.apply(saved, f"config:{name}")
    for o in overrides:
        key, value = parse_override(o)
        layers.set(key, value, "override")
    return from_dict(RunConfig, layers.data), layers.sources
