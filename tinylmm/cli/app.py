"""The `tinylmm` console script. Each command is argument parsing + one tinylmm.api call +
rich output; the api imports the ML stack when a command runs, so `--help` is instant."""

from __future__ import annotations

import sys

import typer

from tinylmm.cli import chat, convert, data, evaluate, export, launch, listing, merge, plan, plot, serve, train, zoo
from tinylmm.cli.errors import run_cli

app = typer.Typer(
    name="tinylmm",
    help="Small Large Multimodal Models: train in stages, chat, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("train")(train.train)
app.command("chat")(chat.chat)
app.command("serve")(serve.serve)
app.add_typer(evaluate.app, name="eval")
app.command("merge")(merge.merge)
app.command("convert")(convert.convert)
app.command("export")(export.export)
app.command("ls")(listing.ls)
app.command("cp")(listing.cp)
app.command("plan")(plan.plan)
app.command("plot")(plot.plot)
app.command("launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(launch.launch)
app.add_typer(zoo.app, name="zoo")
app.add_typer(data.app, name="data")


def main() -> None:

    sys.exit(run_cli(app))


if __name__ == "__main__":
    main()
