"""`tinylmm data ...`: working with datasets before training on them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tinylmm.api.data import SHOWN_IDS, check_data

app = typer.Typer(help="Check datasets before training on them.", no_args_is_help=True)


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
