"""`tinylmm zoo ls` and `zoo show` as library calls: what each preset amounts to.

Listing reads the counts recorded for the shipped presets (tinylmm/assets/zoo_counts.json,
kept equal to the meta-device build by tests/test_zoo.py), so it imports no ML library and
answers in well under a second; a registered preset, or one whose model changed, is built
on the meta device. Showing one preset always builds it, memory plan included.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass

from tinylmm.catalog import zoo
from tinylmm.catalog.families import LLM_FAMILIES, VISION_FAMILIES
from tinylmm.schema import ModelSpec, from_dict, to_dict


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
    requires: list  # [module, message] of optional packages the tower needs

    @property
    def total(self) -> int:
        return self.llm + self.vision + self.connector


def stats(name: str) -> Stats:
    return _stats(zoo.model_key(zoo.get(name).model_spec()))


@functools.lru_cache(maxsize=64)
def _stats(spec_json: str) -> Stats:
    # the ML stack, only when a preset is built (listing shipped presets needs none of it)
    from tinylmm.memory import build_meta
    from tinylmm.models.assemble import image_processor_for
    from tinylmm.models.vision import backend_of

    spec = from_dict(ModelSpec, json.loads(spec_json))
    backend = backend_of(spec.vision)
    meta = build_meta(spec)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    images = image_processor_for(spec.vision, meta.vision)
    requirement = backend.requirement(spec.vision)
    return Stats(
        count(meta.llm),
        count(meta.vision),
        backend.uncut_parameters(spec.vision),
        count(meta.connector),
        meta.num_image_tokens,
        images.size,
        meta.vision.patch_size,
        list(images.image_mean),
        list(images.image_std),
        images.pad_to_square,
        images.resize,
        meta.llm_config.model_type,
        backend.model_type(meta.vision),
        list(meta.notes),
        [list(requirement)] if requirement else [],
    )


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def counts(name: str) -> tuple[dict | None, str | None]:
    """(params / visual tokens, None), or (None, why not): a preset whose tower needs an
    optional package that is not installed is listed without its counts."""
    p = zoo.get(name)
    recorded = zoo.shipped_counts(p)
    if recorded is None:
        from tinylmm.models.vision import backend_of

        spec = p.model_spec().vision
        requirement = backend_of(spec).requirement(spec)
        if requirement and not _installed(requirement[0]):
            return None, requirement[1]
        s = stats(name)
        recorded = {"params": s.total, "visual_tokens": s.num_image_tokens, "requires": s.requires}
    for module, message in recorded["requires"]:
        if not _installed(module):
            return None, message
    return recorded, None


def row(name: str) -> dict:
    """One line of `tinylmm zoo ls`."""
    p = zoo.get(name)
    c, missing = counts(name)
    spec = p.model_spec()
    rec = p.info.recommended
    return {
        "name": p.name,
        "family": p.info.family,
        "vision_family": p.info.vision_family,
        "llm": spec.llm.name_or_path or "(inline config)",
        "vision": spec.vision.name_or_path or "(inline config)",
        "params": c and c["params"],
        "visual_tokens": c and c["visual_tokens"],
        "unavailable": missing,
        "template": spec.template,
        "licence": p.info.licence,
        "gated": p.info.gated,
        "commercial": p.info.commercial,
        "recipe": rec.recipe if rec else None,
        "tune": rec.tune if rec else None,
        "source": p.source,
        "description": p.description,
    }


def select(
    *,
    family: str | None = None,
    vision: str | None = None,
    max_params: int | None = None,
    template: str | None = None,
    commercial: bool | None = None,
    gated: bool | None = None,
) -> list[dict]:
    """The rows of `tinylmm zoo ls` that pass every filter given."""
    if family is not None:
        LLM_FAMILIES.get(family)
    if vision is not None:
        VISION_FAMILIES.get(vision)
    out = []
    for name in zoo.names():
        r = row(name)
        if (
            (family is None or r["family"] == family)
            and (vision is None or r["vision_family"] == vision)
            and (max_params is None or (r["params"] is not None and r["params"] <= max_params))
            and (template is None or r["template"] == template)
            and (commercial is None or r["commercial"] is commercial)
            and (gated is None or r["gated"] is gated)
        ):
            out.append(r)
    return out


def plan_summary(name: str, budget_bytes: int | None = None) -> dict | None:
    """The memory plan of the preset's recommended recipe and tune (one GPU, bf16)."""
    from tinylmm.config import resolve
    from tinylmm.memory import DEFAULT_BUDGET, plan_run

    rec = zoo.get(name).info.recommended
    if rec is None:
        return None
    cfg, _ = resolve(name, rec.recipe, tune=rec.tune)
    plan = plan_run(cfg, budget_bytes=budget_bytes or DEFAULT_BUDGET)
    return {
        "recipe": rec.recipe,
        "tune": rec.tune,
        "budget": plan.budget,
        "fits": plan.fits,
        "stages": [
            {
                "name": s.name,
                "tune": s.tune,
                "peak": s.total,
                "fits": s.fits,
                "micro_batch": s.micro_batch,
                "max_micro_batch": s.max_micro_batch,
                "seq_len": s.seq_len,
            }
            for s in plan.stages
        ],
        "notes": plan.notes,
    }


def describe(name: str, budget_bytes: int | None = None, plan: bool = True) -> dict:
    """Everything about a preset: its entry, parameters per part, image input, licence,
    scores and (plan=True) the memory plan of its recommended recipe."""
    p, s = zoo.get(name), stats(name)
    return {
        "name": p.name,
        "description": p.description,
        "source": p.source,
        **asdict(p.info),
        "model": p.model,
        "stage_defaults": p.stage_defaults,
        "run": p.run,
        "params": {
            "llm": s.llm,
            "vision": s.vision,
            "vision_full": s.vision_full,
            "connector": s.connector,
            "total": s.total,
        },
        "visual_tokens": s.num_image_tokens,
        "image": {
            "size": s.image_size,
            "patch_size": s.patch_size,
            "mean": s.image_mean,
            "std": s.image_std,
            "pad_to_square": s.pad_to_square,
            "resize": s.resize,
        },
        "model_types": {"llm": s.llm_model_type, "vision": s.vision_model_type},
        "notes": s.notes,
        "plan": plan_summary(name, budget_bytes) if plan else None,
    }


def recorded_counts() -> dict:
    """What tinylmm/assets/zoo_counts.json holds: every shipped preset built on the meta
    device now (scripts/update_zoo_counts.py writes it; tests/test_zoo.py compares)."""
    out = {}
    for name, p in zoo.presets().items():
        if not p.shipped:
            continue
        s = stats(name)
        out[name] = {
            "model": to_dict(p.model_spec()),
            "params": s.total,
            "visual_tokens": s.num_image_tokens,
            "requires": s.requires,
        }
    return out
