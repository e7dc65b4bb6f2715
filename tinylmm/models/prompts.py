"""What `tinylmm.generate` takes, checked and brought to one shape: a conversation and a list
of images per prompt.

`prompts`: one string, or a list of prompts. A prompt is a string (one user turn) or a
conversation, a list of (role, text) pairs (`human`/`gpt`, or `user`/`assistant`) ending with
a user turn. `<image>` marks where an image goes, as in LLaVA's prompts; a prompt without it
and without images is text-only.
`images`: None (no prompt has one), or one entry per prompt: an image (PIL or a path), a list
of images, or None. With a single string prompt, its entry alone.
A prompt's images must match its `<image>` marks one for one; the error names the prompt.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tinylmm.data.templates import IMAGE_TOKEN
from tinylmm.errors import ConfigError, DataError, did_you_mean

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def prompt_inputs(prompts, images=None) -> tuple[list[list[tuple[str, str]]], list[list[Image.Image]]]:
    """-> (one conversation per prompt, one list of RGB images per prompt)."""
    single = isinstance(prompts, str)
    if single:
        prompts, images = [prompts], None if images is None else [images]
    if not isinstance(prompts, (list, tuple)):
        raise ConfigError(f"prompts must be a string or a list of prompts, not a {type(prompts).__name__}")
    conversations = [conversation(i, p) for i, p in enumerate(prompts)]
    if images is None:
        images = [None] * len(prompts)
    elif not isinstance(images, (list, tuple)):
        raise ConfigError(
            f"images is one {type(images).__name__} for {len(prompts)} prompts: give one entry per prompt"
            " (an image, a list of images or None)"
        )
    elif len(images) != len(prompts):
        raise ConfigError(
            f"images has {len(images)} entries for {len(prompts)} prompts: one per prompt (an image, a list of"
            " images or None)"
        )
    pictures = [prompt_images(i, entry) for i, entry in enumerate(images)]
    for i, (conv, imgs) in enumerate(zip(conversations, pictures)):
        marks = sum(text.count(IMAGE_TOKEN) for _, text in conv)
        if marks != len(imgs):
            raise ConfigError(
                f"prompt {i}: {marks} {IMAGE_TOKEN} in the text but {len(imgs)} image(s);"
                f" put one {IMAGE_TOKEN} where each image goes"
            )
    return conversations, pictures


def conversation(i: int, prompt) -> list[tuple[str, str]]:
    if isinstance(prompt, str):
        return [("human", prompt)]
    if isinstance(prompt, tuple) and len(prompt) == 2 and all(isinstance(x, str) for x in prompt):
        raise ConfigError(
            f"prompt {i} is one ({prompt[0]!r}, ...) pair: a conversation is a list of (role, text) pairs,"
            " so a single one goes in as prompts=[conversation]"
        )
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ConfigError(f"prompt {i} is a {type(prompt).__name__}: a prompt is a string or a list of (role, text)")
    turns = []
    for j, turn in enumerate(prompt):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(x, str) for x in turn)):
            raise ConfigError(f"prompt {i}, turn {j}: not a (role, text) pair of strings: {turn!r}")
        role, text = turn
        if role not in ROLES:
            raise ConfigError(
                f"prompt {i}, turn {j}: unknown role '{role}'{did_you_mean(role, ROLES)}; known: {', '.join(ROLES)}"
            )
        turns.append((ROLES[role], text))
    if turns[-1][0] != "human":
        raise ConfigError(f"prompt {i}: the conversation ends with an assistant turn; it ends with the user's question")
    return turns


def prompt_images(i: int, entry) -> list[Image.Image]:
    if entry is None:
        return []
    entries = list(entry) if isinstance(entry, (list, tuple)) else [entry]
    out = []
    for j, image in enumerate(entries):
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise DataError(f"prompt {i}, image {j}: {path} does not exist")
            with Image.open(path) as im:
                image = im.convert("RGB")
        elif not isinstance(image, Image.Image):
            raise ConfigError(f"prompt {i}, image {j} is a {type(image).__name__}, not a PIL image or a path")
        out.append(image)
    return out
