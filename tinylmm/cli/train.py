from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tinylmm import api
from tinylmm.cli.zoo import ZOO_HELP


def train(
    overrides: list[str] = typer.Argument(None, help="key=value config overrides, e.g. stages.finetune.lr=1e-4"),
    preset: str = typer.Option("toy", "--preset", "-p", help="model preset (tinylmm ls presets)"),
    recipe: str = typer.Option("share", "--recipe", "-r", help="recipe name or YAML file (tinylmm ls recipes)"),
    tune: Optional[str] = typer.Option(
        None,
        "--tune",
        "-t",
        help="auto | full | lora | qlora: how stages that train the LLM train it. auto, the default for every "
        "preset but the toy (which keeps its recipe's modes): per stage the first of full, lora, qlora whose memory "
        "plan fits the detected CUDA GPU, at the recipe's micro-batch or the largest smaller one that fits (global "
        "batch unchanged), announced and written in config.yaml; on a CPU or mps the recipe's modes are kept. "
        "lora/qlora: adapters at lora.lr, TinyLLaVA's r128 a256 2e-4",
    ),
    llm: Optional[str] = typer.Option(
        None, "--llm", help="load the preset's LLM (and its tokenizer) from this local directory or hub id"
    ),
    vision: Optional[str] = typer.Option(
        None, "--vision", help="load the preset's vision tower from this local directory or hub id"
    ),
    output_dir: Optional[Path] = typer.Option(
        None, "--output-dir", "-o", help="run directory (default runs/<preset>-<recipe>-<time>)"
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", help="a saved config.yaml to run again (overrides still apply)"
    ),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the interrupted run in this directory"),
    no_eval: bool = typer.Option(False, "--no-eval", help="skip the held-out evaluation after the last stage"),
    zoo_file: Optional[Path] = typer.Option(None, "--zoo", help=ZOO_HELP),
):
    """Train a model through every stage of a recipe (default: toy preset, shapes data, share recipe)."""
    from rich.console import Console

    api.register_zoo(zoo_file)
    console = Console(stderr=True)
    result = api.train_run(
        preset=preset,
        recipe=recipe,
        overrides=overrides or [],
        output_dir=output_dir,
        config=config,
        resume=resume,
        evaluate=not no_eval,
        console=console,
        tune=tune,
        llm=llm,
        vision=vision,
    )
    if not result.is_main:
        return
    out = Console()
    if result.eval:
        out.print(f"held-out accuracy {result.eval['accuracy']:.1%} (chance {result.eval['chance']:.1%})")
    out.print(f'final model: [bold]{result.final}[/bold]   try: tinylmm chat {result.final} --image IMG "question"')
