"""The library calls behind the CLI commands, one per command (commands.py), and the zoo's
listing and detail (zoo.py). `tinylmm.load` and `tinylmm.build` are `load` and `build` here."""

from tinylmm.api import zoo
from tinylmm.api.commands import (
    LISTINGS,
    ChatSession,
    answer_benchmark,
    build,
    build_pope,
    convert_checkpoint,
    copy_recipe,
    copy_shipped,
    evaluate_answers,
    evaluate_checkpoint,
    evaluates_itself,
    export_checkpoint,
    listing,
    load,
    merge_checkpoint,
    plan,
    plot_run,
    register_zoo,
    resolve_config,
    score_answers,
    train_run,
)
from tinylmm.api.launch import launch
from tinylmm.api.launch import split_command as split_launch_command
from tinylmm.api.serving import serve, serve_app

zoo_select = zoo.select
zoo_describe = zoo.describe

__all__ = [
    "LISTINGS",
    "answer_benchmark",
    "ChatSession",
    "build",
    "build_pope",
    "convert_checkpoint",
    "launch",
    "copy_recipe",
    "copy_shipped",
    "evaluate_answers",
    "evaluate_checkpoint",
    "evaluates_itself",
    "export_checkpoint",
    "listing",
    "load",
    "merge_checkpoint",
    "plan",
    "plot_run",
    "register_zoo",
    "resolve_config",
    "score_answers",
    "serve",
    "serve_app",
    "split_launch_command",
    "train_run",
    "zoo",
    "zoo_describe",
    "zoo_select",
]
