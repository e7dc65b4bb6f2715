from __future__ import annotations

import typer

from tinylmm import api


def launch(ctx: typer.Context):
    """Run a tinylmm command in several processes through accelerate.

    tinylmm launch ACCELERATE_OPTIONS... COMMAND ARGS..., e.g. tinylmm launch --num_processes 2 train --recipe base

    Options before the command go to `accelerate launch` (--num_processes, --config_file, multi-node flags).

    A failed process ends the launch with its own error and exit code; Ctrl-C saves a checkpoint in every process.
    """
    root = ctx.find_root()
    commands = set(root.command.list_commands(root)) - {"launch"}
    options, command = api.split_launch_command(list(ctx.args), commands)
    raise typer.Exit(api.launch(options, command))
