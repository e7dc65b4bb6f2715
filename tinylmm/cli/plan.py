from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tinylmm import api
from tinylmm.cli.zoo import ZOO_HELP
from tinylmm.sizes import fmt_bytes


def plan(
    overrides: list[str] = typer.Argument(None, help="key=value config overrides, as for `tinylmm train`"),
    preset: str = typer.Option("toy", "--preset", "-p", help="model preset (tinylmm ls presets)"),
    recipe: str = typer.Option("share", "--recipe", "-r", help="recipe name or YAML file (tinylmm ls recipes)"),
    tune: Optional[str] = typer.Option(
        None,
        "--tune",
        help="auto | full | lora | qlora: how stages that train the LLM train it. auto, the default for every "
        "preset but the toy: per stage the first of full, lora, qlora (and the recipe's micro-batch or a smaller "
        "one) that fits --device cuda and --budget, as `tinylmm train` chooses on that GPU",
    ),
    llm: Optional[str] = typer.Option(
        None, "--llm", help="the preset's LLM from this local directory (its config.json is planned)"
    ),
    vision: Optional[str] = typer.Option(None, "--vision", help="the preset's vision tower from this local directory"),
    seq_len: Optional[int] = typer.Option(
        None, "--seq-len", min=1, help="tokens per sample, visual tokens included (default: each stage's max_len)"
    ),
    micro_batch: Optional[int] = typer.Option(
        None, "--micro-batch", min=1, help="samples per step and process (default: each stage's micro_batch_size)"
    ),
    logit_positions: Optional[int] = typer.Option(
        None,
        "--logit-positions",
        min=1,
        help="positions per sample where the LM head runs: those whose next token some sample supervises "
        "(default: every text position, the worst case)",
    ),
    budget: str = typer.Option(
        "24GB", "--budget", help="memory of the device, e.g. 24GB, 16GiB, 12000MB (GB = GiB = 2^30 bytes)"
    ),
    device: str = typer.Option("cuda", "--device", help="cuda (default: plan for one GPU) | cpu"),
    json_out: bool = typer.Option(False, "--json", help="print the plan as JSON"),
    zoo_file: Optional[Path] = typer.Option(None, "--zoo", help=ZOO_HELP),
):
    """Plan the memory of every stage (no weights needed): breakdown, total, verdict, largest micro-batch."""
    import json

    from rich.console import Console

    api.register_zoo(zoo_file)
    result = api.plan(
        preset,
        recipe,
        overrides or [],
        tune=tune,
        llm=llm,
        vision=vision,
        seq_len=seq_len,
        micro_batch=micro_batch,
        logit_positions=logit_positions,
        budget=budget,
        device=device,
    )
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    out = Console()
    out.print(
        f"[bold]memory plan[/bold]: preset {result.preset}, recipe {result.recipe}, {result.device}, "
        f"budget {fmt_bytes(result.budget)}" + (f", --tune {tune}" if tune else "")
    )
    if result.tune_auto:  # what the tables below plan
        out.print(f"[bold]{result.tune_auto}[/bold]", highlight=False)
    for table, stage in zip(result.rich_tables(), result.stages):
        out.print(table)
        for note in stage.notes:
            out.print(f"[dim]note: {note}[/dim]", highlight=False)
        if not stage.fits:
            out.print(f"[yellow]{stage.warning()}[/yellow]", highlight=False)
    for note in result.notes:
        out.print(f"[dim]note: {note}[/dim]", highlight=False)
    verdict = "[green]every stage fits[/green]" if result.fits else "[bold red]some stages do not fit[/bold red]"
    out.print(f"{verdict} in {fmt_bytes(result.budget)}")
