from __future__ import annotations

from pathlib import Path

import typer

from tinylmm.api import serve as serve_model


def serve(
    model_dir: Path = typer.Argument(..., help="a checkpoint directory, e.g. runs/x/final"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (default: this machine only)"),
    port: int = typer.Option(8000, help="port to listen on"),
    max_batch: int = typer.Option(8, help="most requests generated together in one batch"),
    max_image_mb: float = typer.Option(10.0, help="largest image a request may carry (decoded), in MiB"),
    allow_text_only: bool = typer.Option(
        False, "--allow-text-only", help="answer conversations without an image (refused by default)"
    ),
):
    """Serve a model: an OpenAI-compatible API (/v1/chat/completions, /v1/models; images as
    base64 data URLs only) and a chat page at /."""
    serve_model(model_dir, host, port, max_batch=max_batch, max_image_mb=max_image_mb, allow_text_only=allow_text_only)
