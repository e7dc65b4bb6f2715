"""Expected failures (bad config, missing data or model) end in one red line and exit 2."""

from __future__ import annotations

from rich.console import Console


def _user_errors() -> tuple[type[BaseException], ...]:
    from tinylmm.errors import ConfigError

    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError, FileExistsError]
    try:
        from tinylmm.data.llava import DataError
        from tinylmm.data.templates import TemplateError

        errors += [DataError, TemplateError]
    except ImportError:  # pragma: no cover - the ML stack is missing; let it surface
        pass
    return tuple(errors)


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
        if isinstance(e, _user_errors()):
            from rich.markup import escape  # messages quote brackets: pip install 'tinylmm[openclip]'

            Console(stderr=True).print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False)
            return 2
        raise
    return 0
