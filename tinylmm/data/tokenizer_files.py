"""Saving a tokenizer so that it reloads to the same tokenization: the one function every
writer of a tokenizer directory calls (checkpoints, `convert`, `merge`, `export`).

Why `save_pretrained` alone is not enough (transformers 5): a tokenizer class with its own
`__init__` (LlamaTokenizer, Qwen2Tokenizer, GemmaTokenizer ...) rebuilds its normalizer,
pre-tokenizer and decoder from its constructor flags on every load, ignoring those stored in
tokenizer.json. A flag the constructor consumes without passing it on to
`PreTrainedTokenizerBase.__init__` never reaches `init_kwargs`, so `save_pretrained` leaves it
out of tokenizer_config.json and the reload takes the default. LlamaTokenizer's `legacy` is
one: loaded with `"legacy": true` its Metaspace pre-tokenizer prepends "▁" to every text
segment (prepend_scheme "always", so `</s>USER:` is `▁USER`, `:`); saved and reloaded it is
`legacy=False` ("first": `U`, `SER`, `:`). The rule followed is transformers' own: a
tokenizer is "the saved files + the constructor kwargs in tokenizer_config.json"
(`PreTrainedTokenizerBase.save_pretrained` writes `init_kwargs`), so the flags the class
consumes are written there too.

Then the saved directory is loaded back and compared with the tokenizer in memory: the
backend pipeline, the special tokens (strings and ids), the added tokens, the chat template
and the ids of probe texts (every special token mid-text, leading and trailing whitespace,
newlines, non-ASCII). A difference raises TokenizerRoundTripError naming the directory and
what differs, so a checkpoint that would tokenize differently is never written silently
(write_atomically keeps the last good one).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from transformers import AutoTokenizer

CONFIG = "tokenizer_config.json"
# Constructor parameters that are data, not flags (the files carry them).
_NOT_FLAGS = {"self", "args", "kwargs", "vocab", "merges", "vocab_file", "merges_file", "tokenizer_file"}
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TokenizerRoundTripError(RuntimeError):
    """A saved tokenizer reloads to a different tokenization or different special tokens."""


def save_tokenizer(tokenizer, directory: str | Path) -> Path:
    """`tokenizer.save_pretrained(directory)`, plus the constructor flags it drops, then a
    reload checked against `tokenizer`; returns the directory."""
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    return complete_saved(tokenizer, directory)


def complete_saved(tokenizer, directory: str | Path) -> Path:
    """For a tokenizer already written to `directory` by another save (a transformers
    processor's save_pretrained): add the constructor flags it dropped, check the reload."""
    directory = Path(directory)
    flags = consumed_flags(tokenizer)
    if flags:
        path = directory / CONFIG
        config = json.loads(path.read_text())
        missing = {k: v for k, v in flags.items() if k not in config}
        if missing:
            path.write_text(json.dumps({**config, **missing}, indent=2, ensure_ascii=False) + "\n")
    check_reload(tokenizer, directory)
    return directory


def consumed_flags(tokenizer) -> dict:
    """The scalar constructor parameters of the tokenizer's class (and its parents below the
    library's base classes) that the instance keeps as attributes of the same name: the flags
    its `__init__` rebuilds the pipeline from."""
    flags = {}
    for cls in type(tokenizer).__mro__:
        if cls.__module__.startswith("transformers.tokenization_utils") or cls is object:
            break  # the base classes keep their arguments in init_kwargs themselves
        if "__init__" not in cls.__dict__:
            continue
        for name in inspect.signature(cls.__init__).parameters:
            if name in _NOT_FLAGS or name in _SPECIAL_NAMES or name in flags:
                continue
            value = getattr(tokenizer, name, inspect.Parameter.empty)
            if value is None or isinstance(value, (bool, int, float, str)):
                flags[name] = value
    return flags


def probe_texts(tokenizer) -> list[str]:
    """Texts that tell two tokenizations apart: each special token in the middle of words,
    at the start and at the end, leading and trailing spaces, newlines, non-ASCII."""
    specials = sorted(set(tokenizer.all_special_tokens) | {str(t) for t in tokenizer.added_tokens_decoder.values()})
    texts = [
        "Hello world",
        "  leading and trailing spaces  ",
        "\n\nnew\nlines\n \n",
        "USER: What is in the image?\nASSISTANT: A red circle.",
        "non-ASCII: café, naïve, 東京, 🙂, ½ — ok",
        " \t tabs\tand  double  spaces ",
    ]
    for s in specials:
        texts += [f"USER: hi{s}USER: there", f"{s}USER:", f"text {s} more", f"end{s}", f"{s}\n{s} \n", f" {s}  x"]
    texts.append("".join(f"{s}ASSISTANT: é\n" for s in specials))
    return texts


def fingerprint(tokenizer) -> dict:
    """What must survive a save: the backend pipeline, special and added tokens, the chat
    template and the ids of the probe texts (with and without the tokenizer's own specials)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    texts = probe_texts(tokenizer)
    # Not the class: AutoTokenizer may pick another for the same files (a LLaVA export's
    # config.json maps to TokenizersBackend, which runs tokenizer.json as written).
    return {
        "pipeline": None
        if backend is None
        else {k: backend.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "model")},
        "special tokens": {
            name: (str(getattr(tokenizer, name)), getattr(tokenizer, name + "_id"))
            for name in _SPECIAL_NAMES
            if getattr(tokenizer, name, None) is not None
        },
        "all special tokens": sorted(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)),
        "added tokens": {i: (str(t), t.special) for i, t in tokenizer.added_tokens_decoder.items()},
        "length": len(tokenizer),
        "chat template": tokenizer.chat_template,
        "ids": [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts],
        "ids without specials": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
    }


def check_reload(tokenizer, directory: str | Path) -> None:
    """Load `directory` back and raise TokenizerRoundTripError if it differs from `tokenizer`."""
    # A tokenizer of remote code was trusted when it was loaded; its reload runs that same code.
    remote = not type(tokenizer).__module__.startswith("transformers.")
    reloaded = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=remote)
    before, after = fingerprint(tokenizer), fingerprint(reloaded)
    diffs = [key for key in before if before[key] != after[key]]
    if not diffs:
        return
    key = diffs[0]
    if key in ("ids", "ids without specials"):
        texts = probe_texts(tokenizer)
        i = next(i for i, (a, b) in enumerate(zip(before[key], after[key])) if a != b)
        detail = f"{key}: {texts[i]!r} -> {before[key][i]} before the save, {after[key][i]} after"
    else:
        detail = f"{key}: {str(before[key])[:300]} before the save, {str(after[key])[:300]} after"
    raise TokenizerRoundTripError(
        f"the tokenizer saved to '{directory}' reloads differently ({', '.join(diffs)}; {detail}); "
        f"what was written would tokenize differently from the {type(tokenizer).__name__} in memory, "
        "so it is not kept"
    )
