"""Expected failures (bad config, missing data or model) end in one red line and exit 2."""

from __future__ import annotations

from rich.console import Console

from tinylmm.errors import ConfigError, DataError, DivergenceError, RunStateError, TemplateError

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


def run_cli(app) -> int:
    try:
        app(standalone_mode=False)
    except SystemExit as e:  # typer/click exits (--help, usage errors)
        return int(e.code or 0)
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - sorted below
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            return 1
        if isinstance(e, USER_ERRORS):
            from rich.markup import escape  # messages quote brackets: pip install 'tinylmm[openclip]'

            Console(stderr=True).print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False)
            return 2
        raise
    return 0
