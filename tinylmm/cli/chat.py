from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tinylmm.api import ChatSession


def chat(
    model_dir: Path = typer.Argument(..., help="a checkpoint directory, e.g. runs/x/final"),
    prompt: Optional[str] = typer.Argument(None, help="ask one question and exit (omit for an interactive chat)"),
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="image to talk about"),
    max_new_tokens: int = typer.Option(256, help="longest answer, in tokens"),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples"),
    load_4bit: bool = typer.Option(
        False, "--load-4bit", help="load the LLM in 4-bit NF4 (bitsandbytes): about a quarter of the memory"
    ),
):
    """Chat with a trained model; answers stream as they are generated. In the interactive
    chat, `/image PATH` switches image, `/reset` clears the history, `/quit` leaves."""

    session = ChatSession(model_dir, max_new_tokens=max_new_tokens, temperature=temperature, load_4bit=load_4bit)
    if image is not None:
        session.set_image(image)
    if prompt is not None:
        session.ask(prompt, on_text=lambda t: print(t, end="", flush=True))
        print()
        return
    from rich.console import Console

    console = Console()
    console.print(f"[dim]chatting with {model_dir}; /image PATH, /reset, /quit[/dim]")
    while True:
        try:
            line = console.input("[bold]you>[/bold] ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            continue
        if line.startswith("/image"):
            try:
                session.set_image(Path(line.split(maxsplit=1)[1]))
                console.print(f"[dim]image: {session.image_path}[/dim]")
            except (IndexError, FileNotFoundError, OSError) as e:
                console.print(f"[red]{e if not isinstance(e, IndexError) else 'usage: /image PATH'}")
            continue
        print("bot> ", end="", flush=True)
        session.ask(line, on_text=lambda t: print(t, end="", flush=True))
        print()
