"""Offline-first loading: a hub id or a local directory, and one clear message when missing."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tinylmm.errors import ConfigError, unknown
from tinylmm.resources import asset

# `builtin:<name>`: models shipped inside the package, in a hub checkout's layout; made by
# scripts/pretrain_toy.py (the tokenizer `builtin:toy` lives with the toy LLM).
BUILTIN = {"toy": "toy/llm", "toy-llm": "toy/llm", "toy-siglip": "toy/siglip"}


def resolve_location(name: str) -> str:
    """The directory of a `builtin:` model; any other hub id or path as given."""
    if not name.startswith("builtin:"):
        return name
    key = name.split(":", 1)[1]
    if key not in BUILTIN:
        raise unknown("built-in model", key, BUILTIN)
    return str(asset(BUILTIN[key]))


class ModelNotFoundError(FileNotFoundError):
    pass


def _missing_message(what: str, name: str, err: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    looked = (
        f"the local directory '{name}'"
        if Path(name).exists()
        else (
            f"a local directory '{name}' (none exists) and the Hugging Face hub id '{name}'"
            + (" in the local cache only (HF_HUB_OFFLINE=1)" if offline else "")
        )
    )
    return (
        f"could not load the {what} '{name}': looked for {looked}.\n"
        f"  Fix: download it once (huggingface-cli download {name} --local-dir DIR) and point "
        f"tinylmm at DIR: `--llm DIR` / `--vision DIR`, or `model.llm.name_or_path=DIR` / "
        f"`model.vision.name_or_path=DIR`.\n"
        f"  ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    )


def from_pretrained_or_fail(cls, name: str, what: str, **kwargs):
    """`cls.from_pretrained(name)`, turning any not-found/network failure into one message."""
    path = Path(resolve_location(name)).expanduser()
    if path.exists() and not path.is_dir():
        raise ModelNotFoundError(f"the {what} path '{name}' is a file; give its directory")
    try:
        with refusing_remote_code(what, name):
            return cls.from_pretrained(str(path) if path.exists() else name, **kwargs)
    except (OSError, ValueError) as err:
        # OSError: missing files / no cache entry; ValueError: transformers' "couldn't connect".
        if isinstance(err, ValueError) and "connect" not in str(err).lower() and "offline" not in str(err).lower():
            raise
        raise ModelNotFoundError(_missing_message(what, name, err)) from None


@contextlib.contextmanager
def refusing_remote_code(what: str, name):
    """transformers' refusal of a model's own code (trust_remote_code off) as a ConfigError
    that names tinylmm's key for it."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ConfigError(
            f"the {what} '{name}' ships its own Python code (its config's auto_map), which tinylmm "
            "runs only with model.llm.trust_remote_code=true; set it only for a repository you trust"
        ) from None


def quiet_libraries() -> None:
    """tinylmm's own output is what the user reads: no per-file bars from transformers when
    a checkpoint or an LLM base is written or read, no deprecation chatter between libraries."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # peft -> transformers
