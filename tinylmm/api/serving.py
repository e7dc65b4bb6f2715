"""`tinylmm serve`: a checkpoint behind an OpenAI-compatible API and a chat page
(tinylmm/serve/). `serve_app` gives the app (to embed or test), `serve` runs it with uvicorn.
Both need the `serve` extra (FastAPI + uvicorn), imported when called."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from tinylmm.errors import ConfigError

NEEDS = "tinylmm serve needs FastAPI and uvicorn: pip install 'tinylmm[serve]'"


def model_name(model_dir) -> str:
    """What clients call the model: the checkpoint directory's name, with its run's name in
    front where that name says nothing alone (`runs/x/final` -> `x/final`)."""
    path = Path(os.path.abspath(model_dir))  # not resolve(): a run's final/ links to its last stage's
    if path.name == "final" or path.name.startswith("step-"):
        return f"{path.parent.name}/{path.name}"
    return path.name


def serve_app(
    model_dir,
    *,
    max_batch: int = 8,
    max_image_mb: float = 10.0,
    allow_text_only: bool = False,
    **load_kwargs,
):
    """The FastAPI app serving the checkpoint at `model_dir` (tinylmm.serve.create_app)."""
    try:
        from tinylmm.serve import create_app
    except ImportError as e:
        raise ConfigError(f"{NEEDS} ({e})") from None
    from tinylmm.api.commands import load

    if max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, not {max_batch}")
    if max_image_mb <= 0:
        raise ConfigError(f"--max-image-mb must be above 0, not {max_image_mb}")
    model, processor = load(model_dir, **load_kwargs)
    model.eval()
    return create_app(
        model,
        processor,
        model_name=model_name(model_dir),
        max_batch=max_batch,
        max_image_bytes=int(max_image_mb * 2**20),
        require_image=not allow_text_only,
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reach(host: str) -> str:
    """Who can reach a server bound to `host`, as the start-up line says it."""
    if is_loopback(host):
        return f"bound to {host}: only this machine can reach it (--host 0.0.0.0 to listen on every interface)"
    return f"bound to {host}: other machines can reach it, and it has no authentication"


def serve(model_dir, host: str = "127.0.0.1", port: int = 8000, *, console=None, **options) -> None:
    """Serve `model_dir` on host:port until interrupted. The default host is this machine
    only (127.0.0.1); the start-up line says where it listens and who can reach it."""
    try:
        import uvicorn
    except ImportError as e:
        raise ConfigError(f"{NEEDS} ({e})") from None
    from rich.console import Console

    console = console or Console(stderr=True)
    app = serve_app(model_dir, **options)
    where = reach(host)
    console.print(
        f"[bold]serving {app.state.model_name}[/bold] at http://{host}:{port} (the chat page at /, "
        f"the OpenAI API at /v1), {where}",
        highlight=False,
        soft_wrap=True,  # one line, whatever the terminal's width
    )
    sys.stderr.flush()
    uvicorn.run(app, host=host, port=port, log_level="info")
