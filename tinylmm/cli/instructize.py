"""`tinylmm data instructize`: VQA / multiple-choice / caption / REC records into LLaVA conversations."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tinylmm.api.instructize import instructize_file
from tinylmm.errors import ConfigError


def _fields(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, key = pair.partition("=")
        if not sep or not name or not key:
            raise ConfigError(f"--field takes FIELD=KEY (e.g. question=Question), got '{pair}'")
        out[name] = key
    return out


def instructize(
    src: Path = typer.Argument(..., help="records: JSON (a list, or an object holding one), JSON lines or CSV"),
    task: str = typer.Option(..., "--task", help="vqa, mcvqa (multiple choice), caption or rec (boxes)"),
    out: Path = typer.Option(..., "--out", help="the LLaVA conversation file to write (JSON)"),
    templates: Optional[Path] = typer.Option(
        None, "--templates", help="a template YAML file (default: the shipped one; `tinylmm ls instruct`)"
    ),
    granularity: str = typer.Option("coarse", help="coarse: one template set per task; fine: per dataset"),
    dataset: Optional[str] = typer.Option(None, help="the dataset's name: its fine-grained set, and the ids' prefix"),
    diversity: str = typer.Option("multiple", help="single: the first template; multiple: one drawn per conversation"),
    turns: int = typer.Option(1, help="QA pairs merged per conversation, per image (0: all of an image's)"),
    dedup: str = typer.Option("question", help="when merging, drop repeated pairs by: question, answer or none"),
    invert: float = typer.Option(0.0, help="fraction of conversations with inverted templates (input inversion)"),
    shuffle_choices: bool = typer.Option(False, help="mcvqa: shuffle the options before lettering them"),
    bbox_format: str = typer.Option("xywh", help="rec: input boxes as xywh or xyxy pixels, or xyxy_norm (0-1)"),
    field: list[str] = typer.Option([], "--field", help="FIELD=KEY: read FIELD from the records' KEY (repeatable)"),
    image_field: str = typer.Option("image", help="the records' image path key"),
    id_field: str = typer.Option("id", help="the records' id key"),
    images: Optional[Path] = typer.Option(None, help="image folder: the size of images whose boxes are in pixels"),
    seed: int = typer.Option(0, help="seeds the templates, inversions and option orders drawn"),
):
    """Turn a VQA, multiple-choice, caption or referring-expression file into LLaVA conversations."""
    from rich.console import Console

    options = dict(
        task=task,
        templates=str(templates) if templates else None,
        granularity=granularity,
        dataset=dataset,
        diversity=diversity,
        turns=turns,
        dedup=dedup,
        invert=invert,
        shuffle_choices=shuffle_choices,
        bbox_format=bbox_format,
        fields=_fields(field),
        image_field=image_field,
        id_field=id_field,
        seed=seed,
    )
    path, report = instructize_file(src, out, options, images=images)
    Console().print(f"{report.summary()}\nconversations: [bold]{path}[/bold]", soft_wrap=True)
