"""The tokenized-dataset cache: a LLaVA-format JSON tokenized once per fingerprint into flat
numpy files, which every later run, resume and process memory-maps instead of tokenizing again.

Why numpy memory maps of our own rather than HF `datasets` (Arrow, fingerprinted cache): a
sample here is a run of token ids and a few supervised spans; Arrow would store the labels as a
second column as long as the ids, and its list columns carry int32 offsets and validity
bitmaps. A flat array of ids (uint16 when the vocabulary fits, as TinyLlama's, Phi-2's and
StableLM-2's do; int32 otherwise) plus the spans is about 2 bytes per token, and mapping it
costs no Python object per sample. Nothing here needs a new dependency.

What is stored, per sample: its id and image paths, its token ids with each image's visual
positions kept as the one `<image>` token (expanded back when a sample is read, so visual
positions are never stored), and its supervised spans (labels are the ids inside them,
IGNORE_INDEX outside). The samples that cannot be used are stored with their reasons, so a run
that maps the cache reports the same skips. Image existence is not cached: files come and go
between runs, and the caller checks them each time.

The fingerprint covers what the tokens depend on: the data file's bytes (sha256), the
tokenizer (its serialised vocabulary and rules, and the added tokens), the template (name and
definition), max_len, the visual tokens per image, and this file's format version. The cache
is written under a temporary name of the writing process and renamed into place when
complete, so a build cut short leaves nothing that looks whole, and two runs building the
same cache at once do not collide.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylmm.data.processor import Encoded, SampleError
from tinylmm.data.templates import IGNORE_INDEX

FORMAT_VERSION = 1
PARALLEL_FROM = 2000  # samples: below this, forking the workers costs more than it saves
CACHE_ENV = "TINYLMM_CACHE"


def cache_root() -> Path:
    """Where tokenized datasets are kept: $TINYLMM_CACHE, else ~/.cache/tinylmm/tokenized."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tinylmm") / "tokenized"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's identity: its full serialisation when fast, else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        [str(tokenizer.added_tokens_decoder.get(i)) for i in sorted(tokenizer.added_tokens_decoder)]
        + [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, type(tokenizer).__name__]
    )
    return hashlib.sha256((text + extra).encode()).hexdigest()


def fingerprint(json_path: Path, processor, template, max_len: int) -> dict:
    """The inputs a cache is valid for; their hash names its folder."""
    return {
        "format": FORMAT_VERSION,
        "data_sha256": file_sha256(json_path),
        "tokenizer": tokenizer_fingerprint(processor.tokenizer),
        "template": f"{template.name}:{template!r}",
        "max_len": max_len,
        "num_image_tokens": processor.num_image_tokens,
        "image_token_id": processor.image_token_id,
    }


@dataclass
class Compact:
    """One tokenized sample as stored: ids with each image as one token, supervised spans."""

    ids: np.ndarray
    spans: list[tuple[int, int]]
    num_images: int


def compact(enc: Encoded, image_token_id: int, num_image_tokens: int) -> Compact:
    """An encoded sample (visual positions expanded) folded back: each run of an image's
    positions becomes one token; spans index the folded ids."""
    ids = np.asarray(enc.input_ids, dtype=np.int64)
    supervised = np.asarray(enc.labels, dtype=np.int64) != IGNORE_INDEX
    image = ids == image_token_id
    # keep every text position and the first position of each image (runs of num_image_tokens)
    keep = ~image
    keep[np.flatnonzero(image)[::num_image_tokens]] = True
    ids, supervised = ids[keep], supervised[keep]
    edges = np.diff(np.concatenate(([0], supervised.astype(np.int8), [0])))
    spans = list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))
    return Compact(ids, spans, enc.num_images)


def expand(ids: np.ndarray, spans, num_images: int, image_token_id: int, num_image_tokens: int) -> Encoded:
    """The stored form back to what `Processor.encode` gave: visual positions expanded."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    ids = ids.astype(np.int64)
    for a, b in spans:
        labels[a:b] = ids[a:b]
    if num_images:
        repeat = np.where(ids == image_token_id, num_image_tokens, 1)
        ids, labels = np.repeat(ids, repeat), np.repeat(labels, repeat)  # an image token is never in a span
    return Encoded(ids.tolist(), labels.tolist(), num_images)


# ---------------------------------------------------------------------------- building

_WORKER: dict = {}


def _encode_chunk(args):
    """Encode samples [start, stop) of the worker's data -> (compact samples, skips)."""
    start, stop = args
    encode = _WORKER["encode"]
    out, skipped = [], []
    for i in range(start, stop):
        sid, rel, enc_or_error = encode(i)
        if isinstance(enc_or_error, SampleError):
            skipped.append((i, sid, f"{enc_or_error.reason}: {enc_or_error.detail}"))
        else:
            c = compact(enc_or_error, _WORKER["image_token_id"], _WORKER["num_image_tokens"])
            out.append((i, sid, rel, c))
    return out, skipped


def build(dest: Path, n: int, encode, processor, meta: dict, num_proc: int = 1) -> None:
    """Tokenize samples 0..n-1 with `encode(i) -> (sample id, image paths, Encoded | SampleError)`
    into the cache folder `dest`, with `num_proc` processes (forked: they share the parsed
    data and the tokenizer without pickling them)."""
    _WORKER.update(encode=encode, image_token_id=processor.image_token_id, num_image_tokens=processor.num_image_tokens)
    chunk = max(1, min(2048, -(-n // (num_proc * 8))))
    jobs = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    try:
        if num_proc > 1 and n >= PARALLEL_FROM:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the forked workers tokenize
            with multiprocessing.get_context("fork").Pool(num_proc) as pool:
                parts = pool.map(_encode_chunk, jobs)
        else:
            parts = [_encode_chunk(job) for job in jobs]
    finally:
        _WORKER.clear()
    samples = [s for part, _ in parts for s in part]
    skipped = [s for _, part in parts for s in part]
    vocab = len(processor.tokenizer)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.int32

    def write(tmp: Path) -> None:
        lengths = np.fromiter((len(c.ids) for *_, c in samples), dtype=np.int64, count=len(samples))
        nspans = np.fromiter((len(c.spans) for *_, c in samples), dtype=np.int64, count=len(samples))
        # per sample: ids offset, length, spans offset, count, images, position in the file
        index = np.zeros((len(samples), 6), dtype=np.int64)
        index[:, 1], index[:, 3] = lengths, nspans
        index[1:, 0], index[1:, 2] = np.cumsum(lengths)[:-1], np.cumsum(nspans)[:-1]
        index[:, 4] = [c.num_images for *_, c in samples]
        index[:, 5] = [pos for pos, *_ in samples]
        ids = np.concatenate([c.ids for *_, c in samples]) if samples else np.zeros(0)
        spans = np.asarray([sp for *_, c in samples for sp in c.spans], dtype=np.int32).reshape(-1, 2)
        strings = [json.dumps([sid, rel]).encode() for _, sid, rel, _ in samples]
        string_index = np.zeros(len(samples) + 1, dtype=np.int64)
        string_index[1:] = np.cumsum([len(s) for s in strings])
        np.save(tmp / "ids.npy", ids.astype(dtype))
        np.save(tmp / "spans.npy", spans)
        np.save(tmp / "index.npy", index)
        np.save(tmp / "string_index.npy", string_index)
        (tmp / "strings.bin").write_bytes(b"".join(strings))
        record = meta | {"samples": len(samples), "total": n, "ids_dtype": np.dtype(dtype).name, "skipped": skipped}
        (tmp / "meta.json").write_text(json.dumps(record, indent=1) + "\n")

    _publish(dest, write)


def _publish(dest: Path, write) -> None:
    """`write(tmp)` into a folder of this process's own, then renamed to `dest`: two runs
    building the same cache at once never write into one folder, and the second to finish
    finds the first's (the same content: the fingerprint is the same) and drops its own."""
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        os.rename(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / "meta.json").exists():
            raise
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _PreadArray:
    """A 1-D .npy file read a slice at a time with pread: the bytes pass through the page
    cache (shared, evictable) without becoming this process's resident pages, as a memory
    map's touched pages would over an epoch. pread takes no file position, so the DataLoader's
    forked workers can share the descriptor."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            self.offset = f.tell()
        self.path, self.dtype, self.size = path, np.dtype(dtype), shape[0]
        self._fd = None

    def read(self, start: int, count: int) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        item = self.dtype.itemsize
        data = os.pread(self._fd, count * item, self.offset + start * item)
        return np.frombuffer(data, dtype=self.dtype)

    def __getstate__(self):  # a spawned worker opens its own descriptor
        return {k: v for k, v in self.__dict__.items() if k != "_fd"} | {"_fd": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


class TokenizedStore:
    """A cache folder, memory-mapped: sample i's id, image paths and Encoded, read on demand."""

    def __init__(self, path: Path, processor):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.ids = _PreadArray(self.path / "ids.npy")
        self.spans = np.load(self.path / "spans.npy", mmap_mode="r")
        self.index = np.load(self.path / "index.npy", mmap_mode="r")
        self.string_index = np.load(self.path / "string_index.npy", mmap_mode="r")
        self.strings = np.memmap(self.path / "strings.bin", dtype=np.uint8, mode="r") if self.string_index[-1] else b""
        self.image_token_id, self.num_image_tokens = processor.image_token_id, processor.num_image_tokens

    def __len__(self) -> int:
        return len(self.index)

    @property
    def skipped(self) -> list[tuple[int, str, str]]:
        """The samples the build found unusable: (position in the file, id, "reason: detail")."""
        return [tuple(s) for s in self.meta["skipped"]]

    def position(self, i: int) -> int:
        """Sample i's place in the data file."""
        return int(self.index[i, 5])

    def names(self, i: int) -> tuple[str, list[str]]:
        """Sample i's id and its image paths (relative to the image folder)."""
        a, b = self.string_index[i], self.string_index[i + 1]
        sid, rel = json.loads(bytes(self.strings[a:b]))
        return sid, rel

    def encoded(self, i: int) -> Encoded:
        off, n, soff, ns, images, _ = (int(v) for v in self.index[i])
        spans = self.spans[soff : soff + ns].tolist()
        return expand(self.ids.read(off, n), spans, images, self.image_token_id, self.num_image_tokens)

    def length(self, i: int) -> int:
        """Sample i's token count with its visual positions expanded."""
        n, images = int(self.index[i, 1]), int(self.index[i, 4])
        return n + images * (self.num_image_tokens - 1)

    def num_images(self, i: int) -> int:
        return int(self.index[i, 4])

    def num_supervised(self, i: int) -> int:
        """Supervised tokens after the causal shift (a label at position 0 is never a target)."""
        _, _, soff, ns, _, _ = (int(v) for v in self.index[i])
        spans = self.spans[soff : soff + ns]
        total = int((spans[:, 1] - spans[:, 0]).sum()) if ns else 0
        return total - int(ns > 0 and spans[0, 0] == 0)


def open_or_build(json_path: Path, processor, template, max_len: int, load_samples, encode, *, num_proc=1, root=None):
    """The store for this data under this tokenizer/template/max_len: mapped when its
    fingerprint is cached, else built first. `load_samples() -> n` parses the data (only on a
    miss); `encode(i)` then encodes sample i. Returns (store, built: bool)."""
    meta = fingerprint(Path(json_path), processor, template, max_len)
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    dest = Path(root or cache_root()) / key
    built = False
    if not (dest / "meta.json").exists():
        n = load_samples()
        build(dest, n, encode, processor, meta | {"source": str(json_path)}, num_proc=num_proc)
        built = True
    return TokenizedStore(dest, processor), built
