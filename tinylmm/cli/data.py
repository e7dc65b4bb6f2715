"""`tinylmm data ...`: working with datasets before training on them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tinylmm.api.data import SHOWN_IDS, check_data, instructize_file
from tinylmm.errors import ConfigError

app = typer.Typer(
    help="Check datasets before training on them; turn VQA, caption or REC records into conversations.",
    no_args_is_help=True,
)


@app.command("check")
def check(
    file: Path = typer.Argument(..., help="a LLaVA-format JSON file"),
    images: Path = typer.Option(..., "--images", help="the image folder its `image` paths start from"),
    preset: str = typer.Option(
        "toy", "--preset", "-p", help="the model whose tokenizer, template and visual tokens count"
    ),
    max_len: Optional[int] = typer.Option(
        None, "--max-len", help="tokens per sample, visual tokens included (default: the preset's longest stage)"
    ),
    write_usable: Optional[Path] = typer.Option(
        None, "--write-usable", help="write the usable samples to this JSON file (never over FILE)"
    ),
    allow_outside_paths: bool = typer.Option(
        False, "--allow-outside-paths", help="accept absolute image paths and paths that leave the image folder"
    ),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="image-decoding processes (default: CPUs)"),
):
    """Check every sample as `tinylmm train` would: JSON structure, turn order, <image> count,
    image files (inside the folder, present, decoding), supervised tokens, length. Exits 1 when
    a sample is unusable, listing each reason with sample ids."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table

    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("decoding images", total=None)
        result = check_data(
            file,
            images,
            preset=preset,
            max_len=max_len,
            allow_outside_paths=allow_outside_paths,
            workers=workers,
            write_usable=write_usable,
            on_decoded=lambda done, total: progress.update(task, completed=done, total=total),
        )
    out = Console(width=200)
    out.print(
        f"{escape(str(result.source))}: {result.usable} of {result.total} samples usable "
        f"(template {result.template}, max_len {result.max_len})",
        highlight=False,
    )
    if result.skipped:
        table = Table("reason", "samples", f"first ids (up to {SHOWN_IDS})", "first detail")
        for reason, items in result.by_reason().items():
            ids = ", ".join(sid for sid, _ in items[:SHOWN_IDS]) + (", ..." if len(items) > SHOWN_IDS else "")
            table.add_row(escape(reason), str(len(items)), escape(ids), escape(items[0][1]))
        out.print(table)
    if result.truncated:
        n, ids = len(result.truncated), ", ".join(result.truncated[:SHOWN_IDS])
        more = ", ..." if n > SHOWN_IDS else ""
        verb = "sample reaches max_len {} and is" if n == 1 else "samples reach max_len {} and are"
        out.print(f"{n} {verb.format(result.max_len)} cut there (still usable): {escape(ids)}{more}")
    if result.written is not None:
        out.print(f"usable samples written to {escape(str(result.written))}", highlight=False)
    if result.skipped:
        raise typer.Exit(1)


def _fields(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, key = pair.partition("=")
        if not sep or not name or not key:
            raise ConfigError(f"--field takes FIELD=KEY (e.g. question=Question), got '{pair}'")
        out[name] = key
    return out


@app.command("instructize")
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
