"""`tinylmm launch [accelerate launch options] COMMAND ARGS...`: accelerate's launcher, run
in this process, for a tinylmm command in each of several processes.

Everything before the tinylmm command (`train`, `eval`, ...) is passed to `accelerate launch`
as given, to its own parser (`--num_processes`, `--config_file`, the multi-node flags); each
process runs `python -m tinylmm.cli.app COMMAND ARGS...`. What it adds to `accelerate launch`:

- `--multi_gpu` when several processes are asked for without a config file, and the
  launcher's defaults spelled out (one machine, no dynamo) so it does not warn about them;
- a failed process ends the launch with that process's exit code and its own one-line error
  (printed once, by the main process), not torch elastic's `ChildFailedError` traceback;
- Ctrl-C works as in one process: each SIGINT the launcher gets is passed to every process
  at once, so the first makes them save a checkpoint at the next step boundary and a second
  quits. torch elastic starts each process in a session of its own (the terminal's Ctrl-C
  reaches only the launcher) and, left to itself, turns the first SIGINT into a shutdown that
  SIGKILLs the processes 30 s later, whether their checkpoint is written or not. SIGTERM
  keeps torch elastic's handling (forwarded, then SIGKILL after the shutdown timeout).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

from tinylmm.errors import ConfigError

# accelerate launch options that choose the distributed setup themselves
_SETUP_FLAGS = ("--config_file", "--multi_gpu", "--cpu", "--use_deepspeed", "--use_fsdp", "--tpu")


def is_main_process() -> bool:
    """Whether this is the main process of a launch: torchrun (under accelerate launch) sets
    RANK for each process; without it there is one process."""
    return os.environ.get("RANK", "0") == "0"


def split_command(args: list[str], commands: set[str]) -> tuple[list[str], list[str]]:
    """-> (accelerate launch options, the tinylmm command and its arguments)."""
    for i, arg in enumerate(args):
        if arg in commands:
            return args[:i], args[i:]
    raise ConfigError(
        "tinylmm launch: no tinylmm command to launch; e.g. tinylmm launch --num_processes 2 train --recipe base"
        f" (commands: {', '.join(sorted(commands))})"
    )


def _flag(option: str) -> str:
    """accelerate takes --num-processes and --num_processes alike."""
    return "--" + option.split("=", 1)[0].lstrip("-").replace("-", "_")


def _spell_out(options: list[str]) -> list[str]:
    given = {_flag(o) for o in options if o.startswith("--")}
    out = list(options)
    if given.isdisjoint(_SETUP_FLAGS):
        processes = _value_of(options, "--num_processes")
        if processes is not None and int(processes) > 1:
            out.append("--multi_gpu")
        out += [] if "--num_machines" in given else ["--num_machines", "1"]
        out += [] if "--dynamo_backend" in given else ["--dynamo_backend", "no"]
        out += [] if "--mixed_precision" in given else ["--mixed_precision", "no"]  # the run picks its own
    return out


def _value_of(options: list[str], name: str) -> str | None:
    for i, o in enumerate(options):
        if o.startswith("--") and _flag(o) == name:
            value = o.partition("=")[2]
            return value or (options[i + 1] if i + 1 < len(options) else None)
    return None


def _pass_to_the_processes(signum, frame) -> None:
    """SIGINT to each process this launcher started (Linux: /proc lists a process's children)."""
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGINT)


def launch(options: list[str], command: list[str]) -> int:
    """Run `command` (a tinylmm command line) under accelerate's launcher. -> exit code."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    given = {_flag(o) for o in options if o.startswith("--")}
    if "--num_processes" not in given and "--config_file" not in given:
        raise ConfigError(
            "tinylmm launch: say how many processes, e.g. --num_processes 2, or give an accelerate "
            "--config_file that does"
        )
    args = launch_command_parser().parse_args([*_spell_out(options), "-m", "tinylmm.cli.app", *command])
    # torch elastic's agent traps these and shuts the processes down; SIGINT is ours (see
    # above). accelerate hands torchrun's options over from its own namespace by name.
    args.signals_to_handle = "SIGTERM,SIGHUP,SIGQUIT"
    previous = signal.signal(signal.SIGINT, _pass_to_the_processes)
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)  # its per-failure log lines repeat what the process said
    try:
        launch_command(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -15: SIGTERM -> 143
    finally:
        elastic.setLevel(level)
        signal.signal(signal.SIGINT, previous)
    return 0
