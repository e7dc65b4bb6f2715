"""Expected failures (bad config, missing data or model) end in one red line and exit 2.

Under `accelerate launch` every process runs the same command and meets the same error:
the main one (RANK 0) prints it, and every one exits with the same code. torch elastic stops
the other processes as soon as one exits, so the others wait before they exit: were the
main process to be stopped before it printed, the error would be lost. A process that still
lives after that wait met an error the main one did not, and prints it, naming its rank."""

from __future__ import annotations

import os
import time

from rich.console import Console

from tinylmm.api.launch import is_main_process
from tinylmm.errors import ConfigError, DataError, DivergenceError, RunInterrupted, RunStateError, TemplateError

# what a user can fix: one red line, exit 2 (anything else is a bug and keeps its traceback)
USER_ERRORS = (
    ConfigError,
    DataError,
    TemplateError,
    RunStateError,
    DivergenceError,
    FileNotFoundError,
    FileExistsError,
)


OTHERS_WAIT_S = 5.0  # how long a process other than the main one lets the main one go first


def _report(message: str) -> None:
    console = Console(stderr=True)
    if is_main_process():
        console.print(message, highlight=False)
        return
    time.sleep(OTHERS_WAIT_S)  # the launcher stops this process here if the main one failed too
    console.print(f"(process {os.environ.get('RANK')}) {message}", highlight=False)


def _click_exception_types() -> tuple[type, ...]:
    """click's ClickException, wherever typer's click lives: typer >= 0.29 carries its own
    copy (`typer._click`), whose exceptions are not click's."""
    import importlib

    types = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            types.append(importlib.import_module(module).ClickException)
        except ImportError:
            continue
    return tuple(types)


def run_cli(app) -> int:
    try:
        code = app(standalone_mode=False)  # click returns a typer.Exit's code here
    except SystemExit as e:  # typer/click exits (--help, usage errors)
        return int(e.code or 0)
    except KeyboardInterrupt:
        _report("[yellow]interrupted")
        return 130
    except RunInterrupted as e:  # SIGINT/SIGTERM: a checkpoint was saved, the message says how to resume
        from rich.markup import escape

        _report(f"[yellow]interrupted:[/yellow] {escape(str(e))}")
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - sorted below
        import typer

        if isinstance(e, _click_exception_types()):  # a usage error: click's own message, exit 2
            if is_main_process():
                e.show()
            return e.exit_code
        if isinstance(e, typer.Abort):
            return 1
        if isinstance(e, USER_ERRORS):
            from rich.markup import escape  # messages quote brackets: pip install 'tinylmm[openclip]'

            _report(f"[bold red]error:[/bold red] {escape(str(e))}")
            return 2
        raise
    return code if isinstance(code, int) else 0
