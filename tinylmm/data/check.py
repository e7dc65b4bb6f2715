"""Checking LLaVA-format samples: the one implementation behind `tinylmm data check` and the
check `tinylmm train` runs at its start (tinylmm.data.llava.LlavaDataset).

Per sample, in this order (the first failure is the sample's reason; those above the image
files depend on the sample alone, and `train` keeps their outcome in the tokenized cache,
tinylmm.data.token_cache; the files are checked on every run):

    bad conversation       not an object, no `conversations` list, a turn without from/value
    bad turn order         turns do not alternate human, gpt, ... (a leading gpt turn is dropped)
    bad image              `image` is not a path or a list of paths
    image count mismatch   `<image>` in the text against the sample's images
    empty answer / template mismatch / no supervised tokens / truncated through an image
                           the template and tokenizer's verdict (Processor.encode), lengths
                           counted with every image's visual tokens, against max_len
    outside image folder   an absolute path, or `..` out of the folder (tinylmm.data.images)
    missing image          the file does not exist
    unreadable image       the file does not decode (`verify_images`: data check always, train
                           with `data.verify_images: true`)

Decoding runs in a process pool (concurrent.futures.ProcessPoolExecutor): PIL releases the
GIL inside its decoders but not in the Python loop that feeds them chunks, nor while it opens
and identifies a file, so threads share one core for much of the work (bench/decode_pool.py).
A worker needs nothing but a path in and a short string out. Workers are forked where the
platform can (Linux), as torch's DataLoader starts its workers: a spawned worker would import
the main module again (torch, transformers: seconds per worker, bench/decode_pool.py). A
forked worker only runs PIL on a file, none of the parent's torch, tokenizers or CUDA state.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tinylmm.data.images import OutsidePath, decode_error, image_path
from tinylmm.data.processor import Encoded, Processor, SampleError
from tinylmm.data.templates import ChatTemplate, Template
from tinylmm.errors import DataError

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
UNREADABLE = "unreadable image"
DECODE_CHUNK = 32  # images per task handed to a worker: amortises the round trip


@dataclass
class Checked:
    """A usable sample: its id, position in the file, tokens and image files."""

    sid: str
    index: int
    encoded: Encoded
    images: list[Path]


def read_samples(json_path: Path) -> list:
    """The samples of a LLaVA-format JSON file; DataError naming the file if it is not a
    non-empty JSON list."""
    json_path = Path(json_path)
    if not json_path.exists():
        raise DataError(f"dataset file '{json_path}' does not exist")
    try:
        raw = json.loads(json_path.read_bytes())  # bytes: json finds UTF-8/16/32 itself
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"dataset file '{json_path}' is not valid JSON: {e}") from None
    except (OSError, RecursionError) as e:  # a directory; nesting deeper than the parser goes
        raise DataError(f"dataset file '{json_path}' cannot be read: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(raw, list):
        raise DataError(f"dataset file '{json_path}' must hold a JSON list of samples")
    if not raw:
        raise DataError(f"dataset file '{json_path}' holds no samples (an empty list)")
    return raw


def sample_id(sample, index: int) -> str:
    """The sample's `id` (a string or a number), else its position in the file: `#<index>`."""
    sid = sample.get("id") if isinstance(sample, dict) else None
    if isinstance(sid, (str, int, float)) and not isinstance(sid, bool) and str(sid).strip():
        return str(sid)
    return f"#{index}"


def image_entries(sample: dict) -> list[str]:
    image = sample.get("image")
    if image is None:
        return []
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise SampleError("bad image", f"'image' must be a path or a list of paths, got {image!r:.80}")
    return images


def conversation_turns(sample: dict) -> list[tuple[str, str]]:
    convs = sample.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise SampleError("bad conversation", "no 'conversations' list")
    turns = []
    for i, turn in enumerate(convs):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        role = ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise SampleError("bad conversation", f"turn {i} needs 'from' (human/gpt) and a string 'value'")
        try:
            turn["value"].encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud800": a lone surrogate, no character at all
            raise SampleError("bad conversation", f"turn {i}: 'value' is not valid Unicode text") from None
        turns.append((role, turn["value"]))
    skip = 1 if turns[0][0] == "gpt" else 0  # some LLaVA data opens with the assistant; TinyLLaVA drops it too
    turns = turns[skip:]
    for i, (role, _) in enumerate(turns):
        if role != ("human" if i % 2 == 0 else "gpt"):
            raise SampleError("bad turn order", f"turn {i + skip} is from '{role}' again (turns must alternate)")
    return turns


def tokenize_sample(
    sample, processor: Processor, template: Template | ChatTemplate, max_len: int
) -> tuple[list[str], Encoded]:
    """The checks that depend on the sample alone (what the tokenized cache keeps): structure,
    turn order, `<image>` count, the template's verdict and the length -> (image entries, tokens)."""
    if not isinstance(sample, dict):
        raise SampleError("bad conversation", "sample is not a JSON object")
    turns = conversation_turns(sample)
    entries = image_entries(sample)
    return entries, processor.encode(turns, template, num_images=len(entries), max_len=max_len)


def sample_files(entries: list[str], image_folder: Path, allow_outside: bool = False) -> list[Path]:
    """The checks of a sample's image files, made on every run: inside the folder, existing."""
    try:
        images = [image_path(image_folder, p, allow_outside) for p in entries]
    except OutsidePath as e:
        raise SampleError("outside image folder", str(e)) from None
    for p in images:
        if not p.is_file():
            raise SampleError("missing image", str(p))
    return images


def check_sample(
    sample,
    image_folder: Path,
    processor: Processor,
    template: Template | ChatTemplate,
    max_len: int,
    allow_outside: bool = False,
) -> tuple[Encoded, list[Path]]:
    """Everything but decoding, for one sample; SampleError (a reason and a detail) if unusable."""
    entries, enc = tokenize_sample(sample, processor, template, max_len)
    return enc, sample_files(entries, image_folder, allow_outside)


def check_samples(
    raw: list,
    image_folder: Path,
    processor: Processor,
    template: Template | ChatTemplate,
    max_len: int,
    *,
    skipped: list[tuple[str, str]],
    allow_outside: bool = False,
    verify_images: bool = False,
    workers: int | None = None,
    on_decoded: Callable[[int, int], None] | None = None,
) -> list[Checked]:
    """The usable samples of `raw`; each unusable one is appended to `skipped` as
    (sample id, "reason: detail"). `verify_images` decodes every image (`workers` processes;
    `on_decoded(done, total)` as they come, for a progress bar)."""
    usable, bad = [], []  # bad: (position, id, "reason: detail")
    for i, sample in enumerate(raw):
        sid = sample_id(sample, i)
        try:
            enc, images = check_sample(sample, image_folder, processor, template, max_len, allow_outside)
        except SampleError as e:
            bad.append((i, sid, f"{e.reason}: {e.detail}"))
            continue
        usable.append(Checked(sid, i, enc, images))
    if verify_images:
        failed = find_unreadable(sorted({p for c in usable for p in c.images}), workers, on_decoded)
        for c in [c for c in usable if any(p in failed for p in c.images)]:
            path = next(p for p in c.images if p in failed)
            bad.append((c.index, c.sid, f"{UNREADABLE}: {path}: {failed[path]}"))
        usable = [c for c in usable if not any(p in failed for p in c.images)]
    skipped.extend((sid, text) for _, sid, text in sorted(bad, key=lambda b: b[0]))
    return usable


def find_unreadable(
    paths: list[Path], workers: int | None = None, on_decoded: Callable[[int, int], None] | None = None
) -> dict[Path, str]:
    """{path: why} for each image that does not decode. `workers` processes (default: the CPU
    count); 1 decodes in this process."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(paths)))
    if workers == 1:
        return _collect(paths, map(decode_error, map(str, paths)), on_decoded)
    chunk = max(1, min(DECODE_CHUNK, len(paths) // workers))
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None  # None: the platform's
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        return _collect(paths, pool.map(decode_error, map(str, paths), chunksize=chunk), on_decoded)


def _collect(paths, results, on_decoded) -> dict[Path, str]:
    failed = {}
    for done, (p, why) in enumerate(zip(paths, results), start=1):
        if why is not None:
            failed[p] = why
        if on_decoded is not None:
            on_decoded(done, len(paths))
    return failed
