"""Validation: a resolved config checked against what the registries know (connectors and
their options, vision backends, templates, benchmarks) and the trainability rules, before
anything is built or read."""

from __future__ import annotations

import math

from tinylmm import trainability
from tinylmm.data.instructize import InstructOptions
from tinylmm.data.mixture import check_balance
from tinylmm.data.templates import TEMPLATES
from tinylmm.errors import ConfigError, unknown
from tinylmm.eval.base import benchmark_that_can
from tinylmm.models.connectors import CONNECTORS, connector_options
from tinylmm.models.connectors.base import check_patches
from tinylmm.models.vision import VISION_BACKENDS, backend_of
from tinylmm.schema import COMPONENTS, RunConfig


def _check_connector_grid(cfg: RunConfig) -> None:
    """A connector that needs a particular grid (pixel_shuffle's factor must divide its side)
    is checked against the tower's, from its architecture on the meta device. A tower whose
    architecture is not known offline is checked when it is built."""
    if not hasattr(CONNECTORS.get(cfg.model.connector.type, "model.connector.type"), "check_patches"):
        return
    try:
        tower = backend_of(cfg.model.vision).build(cfg.model.vision, device="meta")
    except (ConfigError, ImportError):
        return
    check_patches(cfg.model.connector, tower.num_patches)


def validate(cfg: RunConfig) -> None:
    connector_options(cfg.model.connector)
    _check_connector_grid(cfg)
    VISION_BACKENDS.get(cfg.model.vision.backend, "model.vision.name_or_path").validate(cfg.model.vision)
    if cfg.model.vision.image_size is not None and cfg.model.vision.image_size <= 0:
        raise ConfigError(
            f"model.vision.image_size={cfg.model.vision.image_size} must be positive (or null: the tower's own)"
        )
    TEMPLATES.get(cfg.model.template, "model.template")
    if not cfg.stages:
        raise ConfigError("the recipe has no stages")
    for bench in cfg.eval.bench:
        benchmark_that_can(bench, "evaluate", "eval.bench")
    for name, st in cfg.stages.items():
        where = f"stages.{name}"
        if st.template is not None:
            TEMPLATES.get(st.template, f"{where}.template")
        for comp in st.tune:
            if comp not in COMPONENTS:
                raise unknown(f"component in {where}.tune", comp, COMPONENTS)
        for comp in COMPONENTS:
            st.tune.setdefault(comp, "frozen")
            trainability.mode(st, comp, where)
        _check_data(st.data, f"{where}.data")
        for key in ("batch_size", "micro_batch_size", "max_steps", "save_every"):
            if getattr(st, key) is not None and getattr(st, key) < 1:
                raise ConfigError(f"{where}.{key}={getattr(st, key)} must be >= 1")
        if st.batch_size % st.micro_batch_size:
            raise ConfigError(
                f"{where}: batch_size {st.batch_size} is not a multiple of micro_batch_size {st.micro_batch_size}"
            )
        trainability.check_rates(st, where)
        if not (0 < st.epochs < math.inf) or st.max_len <= 0:  # written so that nan fails too
            raise ConfigError(
                f"{where}: epochs and max_len must be positive (epochs={st.epochs}, max_len={st.max_len})"
            )
        if not 0 <= st.warmup_ratio < 1:
            raise ConfigError(f"{where}.warmup_ratio must be in [0, 1)")
        if not 0 <= st.weight_decay < math.inf:
            raise ConfigError(f"{where}.weight_decay={st.weight_decay} must be >= 0 and finite")
        if not 0 < st.max_grad_norm < math.inf:
            raise ConfigError(f"{where}.max_grad_norm={st.max_grad_norm} must be positive and finite")
    for comp in ("vision", "llm"):
        trainability.structures(cfg, comp)
    if cfg.lora.r <= 0 or cfg.lora.alpha <= 0 or not 0 <= cfg.lora.dropout < 1 or not cfg.lora.targets:
        raise ConfigError("lora: r and alpha must be positive, dropout in [0, 1), targets not empty")
    if not 0 < cfg.lora.lr < math.inf:
        raise ConfigError(f"lora.lr={cfg.lora.lr} must be positive and finite")
    if cfg.quant.bits == 8 and cfg.quant.storage_dtype != "auto":
        raise ConfigError(
            f"quant.storage_dtype={cfg.quant.storage_dtype} stores 4-bit weights; quant.bits=8 (LLM.int8) keeps int8"
        )
    for where, value, least in (
        ("eval.batch_size", cfg.eval.batch_size, 1),
        ("eval.max_new_tokens", cfg.eval.max_new_tokens, 1),
        ("train.num_workers", cfg.train.num_workers, 0),
        *((f"shapes.{k}", getattr(cfg.shapes, k), 0) for k in ("n_caption", "n_instruct", "n_eval", "n_pope")),
        ("shapes.image_size", cfg.shapes.image_size, 1),
    ):
        if value is not None and value < least:
            raise ConfigError(f"{where}={value} must be >= {least}")
    if cfg.train.loss_chunk < 0:
        raise ConfigError(f"train.loss_chunk={cfg.train.loss_chunk} must be >= 0 (0: the whole head at once)")
    if cfg.train.max_bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps={cfg.train.max_bad_steps} must be >= 1")
    if cfg.data.num_proc is not None and cfg.data.num_proc < 1:
        raise ConfigError(f"data.num_proc={cfg.data.num_proc} must be >= 1 (or null: the CPU count)")
    bad = cfg.data.max_bad_images
    if not (0 <= bad < math.inf) or (bad >= 1 and bad != int(bad)):
        raise ConfigError(
            f"data.max_bad_images={bad} must be a whole count (>= 1) or a fraction of the stage's samples in [0, 1)"
        )


def _check_data(data, where: str) -> None:
    """One source per stage, and mixture/instructize options that all take effect."""
    given = [k for k in ("json", "shapes", "datasets") if getattr(data, k) is not None]
    if len(given) != 1:
        raise ConfigError(f"{where}: give exactly one of 'json' (with 'images'), 'shapes' or 'datasets' (a mixture)")
    if data.datasets is None:
        for key in ("balance", "cap"):
            if getattr(data, key) is not None:
                raise ConfigError(f"{where}.{key} balances a mixture: it needs 'datasets'")
    if data.instructize is not None:
        if data.json is None:
            raise ConfigError(f"{where}.instructize converts the records of 'json'; here there is none")
        InstructOptions.from_dict(data.instructize, f"{where}.instructize")
    if data.datasets is None:
        return
    if not data.datasets:
        raise ConfigError(f"{where}.datasets is empty")
    balance = data.balance or "per-dataset"
    check_balance(balance, data.cap, [d.weight for d in data.datasets], where)
    for i, d in enumerate(data.datasets):
        if d.max_samples is not None and d.max_samples < 1:
            raise ConfigError(f"{where}.datasets[{i}].max_samples={d.max_samples} must be >= 1")
        if balance == "per-task" and not d.task:
            raise ConfigError(f"{where}.datasets[{i}] ({d.json}): balance 'per-task' needs its 'task'")
        if d.instructize is not None:
            InstructOptions.from_dict(d.instructize, f"{where}.datasets[{i}].instructize")
