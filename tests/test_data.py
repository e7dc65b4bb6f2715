"""LLaVA-format data: label masking by construction, and unusable samples reported by id."""

import json

import pytest
import torch
from PIL import Image

from tinylmm.data.llava import DataError, LlavaDataset
from tinylmm.data.processor import ImageProcessor, SampleError
from tinylmm.data.templates import IGNORE_INDEX, get_template
from tinylmm.models.assemble import build_model

from conftest import supervised_runs
from test_models import spec


@pytest.fixture(scope="module")
def proc():
    return build_model(spec())[1]


CONVERSATION = [
    ("human", "<image>\nWhat color is the circle?"),
    ("gpt", "red"),
    ("human", "How many shapes are there?"),
    ("gpt", "3"),
    ("human", "Where is the blue square?"),
    ("gpt", "top left, near the edge."),
]


@pytest.mark.parametrize("template", ["llama", "pretrain"])
def test_supervised_spans_are_exactly_the_assistant_messages(proc, template):
    tpl = get_template(template)
    turns = (
        CONVERSATION
        if template != "pretrain"
        else [("human", "<image>\nDescribe."), ("gpt", "A red circle at the top left.")]
    )
    enc = proc.encode(turns, tpl, num_images=1)
    tok = proc.tokenizer
    eos = tpl.end_token(tok)
    spans = [tok.decode(run) for run in supervised_runs(enc.input_ids, enc.labels)]
    answers = [v for r, v in turns if r == "gpt"]
    assert [s.strip() for s in spans] == [(a + eos).strip() for a in answers]
    # image positions and the prompt are never supervised
    assert all(l == IGNORE_INDEX for i, l in zip(enc.input_ids, enc.labels) if i == proc.image_token_id)
    assert enc.input_ids.count(proc.image_token_id) == proc.num_image_tokens


def test_template_text_matches_tinyllava(proc):
    tpl = get_template("llama")
    text, _ = tpl.render(CONVERSATION[:2], "</s>")
    assert text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat color is "
        "the circle? ASSISTANT: red</s>"
    )
    prompt, _ = tpl.render(CONVERSATION[:1], "</s>", add_generation_prompt=True)
    assert prompt.endswith("What color is the circle? ASSISTANT:")
    text, spans = get_template("pretrain").render([("human", "<image>\nDescribe it."), ("gpt", "a cat")], "\n")
    assert text == "<image>a cat\n" and text[spans[0][0] : spans[0][1]] == "a cat\n"


def test_unusable_samples_raise_with_reason(proc):
    with pytest.raises(SampleError, match="image count mismatch"):
        proc.encode(CONVERSATION[:2], num_images=2)
    with pytest.raises(SampleError, match="empty answer"):
        proc.encode([("human", "<image>\nhi"), ("gpt", " ")], get_template("pretrain"), num_images=1)
    with pytest.raises(SampleError, match="no supervised tokens"):
        proc.encode([("human", "a long question " * 10), ("gpt", "x")], num_images=0, max_len=20)
    with pytest.raises(SampleError, match="truncated through an image"):
        proc.encode(CONVERSATION, num_images=1, max_len=40)
    with pytest.raises(SampleError, match="alternate"):
        proc.encode([("human", "a"), ("human", "b")], num_images=0)


def write_dataset(tmp_path, samples):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 10), (0, 255, 0)).save(tmp_path / "img" / "a.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    return path


def test_dataset_reports_and_skips_bad_samples_by_id(proc, tmp_path):
    good = {
        "id": "good",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "green"}],
    }
    text_only = {"id": "text", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}
    samples = [
        good,
        text_only,
        {"id": "noimg", "image": "missing.png", "conversations": good["conversations"]},
        {
            "id": "twoimg",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image><image>\nx"}, {"from": "gpt", "value": "y"}],
        },
        {
            "id": "empty",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": ""}],
        },
        {"id": "nofrom", "conversations": [{"value": "x"}]},
    ]
    ds = LlavaDataset(write_dataset(tmp_path, samples), tmp_path / "img", proc, get_template("pretrain"), 256)
    assert len(ds) == 2
    skipped = dict(ds.report.skipped)
    assert set(skipped) == {"noimg", "twoimg", "empty", "nofrom"}
    assert skipped["noimg"].startswith("missing image") and "missing.png" in skipped["noimg"]
    assert skipped["twoimg"].startswith("image count mismatch")
    assert skipped["empty"].startswith("empty answer")
    assert "skipped 4 of 6" in ds.report.summary()
    batch = ds.collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape[0] == 1
    assert (batch["input_ids"] == proc.image_token_id).sum() == proc.num_image_tokens


def test_dataset_file_errors_name_the_file(proc, tmp_path):
    with pytest.raises(DataError, match="nope.json"):
        LlavaDataset(tmp_path / "nope.json", tmp_path, proc, get_template("llama"), 64)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        LlavaDataset(bad, tmp_path, proc, get_template("llama"), 64)


def test_pad_to_square_uses_the_mean_colour():
    ip = ImageProcessor(size=8, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], pad_to_square=True)
    x = ip(Image.new("RGB", (8, 4), (255, 255, 255)))
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x[:, 0, :], torch.full((3, 8), 0.0039, dtype=x.dtype), atol=0.02)  # mean colour -> ~0
    assert torch.allclose(x[:, 4, :], torch.ones(3, 8))  # the white image, normalised to 1
    squashed = ImageProcessor(8, [0.5] * 3, [0.5] * 3, pad_to_square=False)(Image.new("RGB", (8, 4), (255,) * 3))
    assert torch.allclose(squashed, torch.ones(3, 8, 8))
