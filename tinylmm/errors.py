"""The errors a user can fix, and the did-you-mean wording every unknown name gets."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key at fault."""


class DataError(ValueError):
    """A dataset that cannot be read (a missing file, a file that is not LLaVA-format JSON)."""


class TemplateError(ValueError):
    """A conversation template that does not fit the tokenizer or the conversation."""


class RunStateError(ValueError):
    """A run directory that cannot be resumed (an unreadable or pickled trainer state)."""


class DivergenceError(RuntimeError):
    """Training stopped: too many consecutive steps with a non-finite loss or gradient norm."""


class RunInterrupted(Exception):
    """Training stopped on SIGINT / SIGTERM after saving a checkpoint; the message says how
    to resume. `exit_code` is the shell's for the signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class TemplateMismatch(TemplateError):
    """The template cannot locate a sample's answers (e.g. the chat template rewrites them)."""


def did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, options) -> ConfigError:
    options = sorted(str(o) for o in options)
    return ConfigError(f"unknown {kind} '{name}'{did_you_mean(name, options)}; known: {', '.join(options)}")
