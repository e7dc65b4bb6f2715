"""The tokenized-dataset cache (tinylmm/data/token_cache.py): stored compactly, read back exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tinylmm.data.processor import SampleError
from tinylmm.data.templates import get_template
from tinylmm.data.token_cache import TokenizedStore, compact, expand, open_or_build
from tinylmm.models.assemble import build_model

from test_models import spec

CONVERSATIONS = [
    [("human", "<image>\nWhat color is the circle?"), ("gpt", "red"), ("human", "How many?"), ("gpt", "3")],
    [("human", "Describe <image> and <image>."), ("gpt", "two shapes")],
    [("human", "No image here."), ("gpt", "fine")],
    [("human", "<image>\nhi"), ("gpt", " ")],  # unusable: an empty answer
]
IMAGES = [1, 2, 0, 1]


@pytest.fixture(scope="module")
def proc():
    return build_model(spec())[1]


def encoder(proc, template):
    def encode(i):
        try:
            return (
                f"s{i}",
                [f"{i}-{k}.png" for k in range(IMAGES[i])],
                proc.encode(CONVERSATIONS[i], template, num_images=IMAGES[i], max_len=2048),
            )
        except SampleError as e:
            return f"s{i}", [], e

    return encode


def test_compact_then_expand_is_the_encoding(proc):
    template = get_template("llama")
    for turns, n in zip(CONVERSATIONS[:3], IMAGES):
        enc = proc.encode(turns, template, num_images=n)
        c = compact(enc, proc.image_token_id, proc.num_image_tokens)
        assert len(c.ids) == len(enc.input_ids) - n * (proc.num_image_tokens - 1)  # one token per image
        back = expand(c.ids, c.spans, n, proc.image_token_id, proc.num_image_tokens)
        assert back.input_ids == enc.input_ids and back.labels == enc.labels and back.num_images == n


@pytest.mark.parametrize("num_proc", [1, 2])
def test_store_reads_back_every_sample_and_the_skips(proc, tmp_path, num_proc):
    template = get_template("llama")
    data = tmp_path / "d.json"
    data.write_text(json.dumps(CONVERSATIONS))
    encode = encoder(proc, template)
    loads = []
    store, built = open_or_build(
        data, proc, template, 2048, lambda: loads.append(1) or 4, encode, num_proc=num_proc, root=tmp_path / "c"
    )
    assert built and len(store) == 3 and store.skipped == [(3, "s3", "empty answer: an assistant turn is empty")]
    for i in range(3):
        sid, rel, enc = encode(i)
        assert store.names(i) == (sid, rel)
        got = store.encoded(i)
        assert got.input_ids == enc.input_ids and got.labels == enc.labels
        assert store.num_supervised(i) == sum(1 for x in enc.labels[1:] if x != -100)
        assert store.length(i) == len(enc.input_ids) and store.position(i) == i
    assert store.ids.dtype == np.uint16  # the toy's 512-entry vocabulary
    folded = [compact(encode(i)[2], proc.image_token_id, proc.num_image_tokens) for i in range(3)]
    assert store.ids.size == sum(len(c.ids) for c in folded)  # each image stored as one token
    # a second open maps the cache: the data is not parsed again
    again, built = open_or_build(data, proc, template, 2048, lambda: loads.append(1) or 4, encode, root=tmp_path / "c")
    assert not built and loads == [1] and again.path == store.path


def test_the_fingerprint_follows_data_template_and_max_len(proc, tmp_path):
    template = get_template("llama")
    data = tmp_path / "d.json"
    data.write_text(json.dumps(CONVERSATIONS))
    encode = encoder(proc, template)
    root = tmp_path / "c"
    first, _ = open_or_build(data, proc, template, 2048, lambda: 4, encode, root=root)
    for change in ("max_len", "template", "data"):
        max_len = 1024 if change == "max_len" else 2048
        tpl = get_template("pretrain") if change == "template" else template
        if change == "data":
            data.write_text(json.dumps(CONVERSATIONS) + " ")
        store, built = open_or_build(data, proc, tpl, max_len, lambda: 4, encoder(proc, tpl), root=root)
        assert built and store.path != first.path, change


def test_a_build_cut_short_leaves_no_cache(proc, tmp_path, monkeypatch):
    import errno

    from tinylmm.data import token_cache

    template = get_template("llama")
    data = tmp_path / "d.json"
    data.write_text("[]")
    saved = []

    def disk_full(path, array):
        saved.append(path)
        if len(saved) == 2:  # the second file of the cache does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, array)

    real_save = np.save
    monkeypatch.setattr(token_cache.np, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        open_or_build(data, proc, template, 2048, lambda: 4, encoder(proc, template), root=tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []  # neither a cache nor its partial .tmp
    monkeypatch.setattr(token_cache.np, "save", real_save)
    store, built = open_or_build(data, proc, template, 2048, lambda: 4, encoder(proc, template), root=tmp_path / "c")
    assert built and len(store) == 3
    assert TokenizedStore(store.path, proc).names(0) == ("s0", ["0-0.png"])


def test_a_dataset_maps_the_cache_on_its_second_reading(proc, tmp_path, monkeypatch):
    from tinylmm.data import llava
    from tinylmm.data.llava import LlavaDataset
    from tinylmm.data.shapes import write_shapes_dataset

    monkeypatch.setenv("TINYLMM_CACHE", str(tmp_path / "cache"))
    paths = write_shapes_dataset(tmp_path / "shapes", n_caption=4, n_instruct=10, n_eval=2, n_pope=1, image_size=32)
    samples = json.loads(paths["instruct"].read_text())
    samples[3]["conversations"][1]["value"] = " "  # unusable: an empty answer
    paths["instruct"].write_text(json.dumps(samples))
    template = get_template("llama")
    first = LlavaDataset(paths["instruct"], paths["images"], proc, template, 256)
    assert first.built and len(first) == 9 and first.report.skipped[0][0] == samples[3]["id"]

    def no_parsing(path):
        raise AssertionError("the data file was parsed again")

    monkeypatch.setattr(llava, "read_samples", no_parsing)
    again = LlavaDataset(paths["instruct"], paths["images"], proc, template, 256)
    assert not again.built and again.report.skipped == first.report.skipped
    for i in range(len(first)):
        assert again.sample_id(i) == first.sample_id(i)
        assert again.encoded(i) == first.encoded(i) and again.num_supervised(i) == first.num_supervised(i)
        assert again[i][0] == first[i][0] and torch.equal(again[i][1][0], first[i][1][0])
    # the image files are checked on every run, whatever the cache says
    gone = paths["images"] / samples[5]["image"]
    gone.unlink()
    third = LlavaDataset(paths["instruct"], paths["images"], proc, template, 256)
    assert not third.built and len(third) == 8
    assert [sid for sid, _ in third.report.skipped] == [samples[3]["id"], samples[5]["id"]]  # file order
    assert third.report.skipped[1][1].startswith("missing image")
    # cache=False tokenizes for the dataset alone, every time, and leaves the cache as it was
    monkeypatch.undo()
    monkeypatch.setenv("TINYLMM_CACHE", str(tmp_path / "cache"))
    before = sorted(p.name for p in (tmp_path / "cache" / "tokenized").iterdir())
    alone = LlavaDataset(paths["instruct"], paths["images"], proc, template, 256, cache=False)
    assert alone.built and len(alone) == 8
    assert sorted(p.name for p in (tmp_path / "cache" / "tokenized").iterdir()) == before


def test_the_data_settings_are_checked():
    from tinylmm import api
    from tinylmm.errors import ConfigError

    from conftest import TINY

    with pytest.raises(ConfigError, match=r"data.num_proc=0 must be >= 1"):
        api.resolve_config("toy", "share", [*TINY, "data.num_proc=0"])
    with pytest.raises(ConfigError, match="cach"):
        api.resolve_config("toy", "share", [*TINY, "data.cach=false"])
