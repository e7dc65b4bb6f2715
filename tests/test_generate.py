"""`tinylmm.generate` and the batched generation under it (tinylmm.models.generation): on a
tiny random model and on the shipped pretrained toy, greedy answers of one left-padded batch
(prompts of different lengths, 0, 1 or 2 images, text-only, a multi-turn conversation) equal
the answers one prompt at a time, token for token; the KV cache path equals recomputing the
whole sequence each step; the arguments are checked naming the prompt at fault. Also the
`eval run` progress bar's questions/s and ETA."""

from __future__ import annotations

import functools
import io

import pytest
import torch
from PIL import Image

import tinylmm
from tinylmm.errors import ConfigError, DataError
from tinylmm.models.generation import generate_tokens
from tinylmm.models.prompts import prompt_inputs

from conftest import TINY

RED, BLUE = Image.new("RGB", (32, 32), (220, 20, 20)), Image.new("RGB", (24, 40), (20, 20, 220))
PROMPTS = [
    "<image>\nWhat color is the circle?",
    "How many shapes are there in the picture, counting every square and every circle?",
    "<image>\n<image>\nAre the two pictures the same? Answer yes or no.",
    "Shape?",
    [("human", "<image>\nWhat color is it?"), ("gpt", "red"), ("human", "And the shape?")],
]
IMAGES = [RED, None, [RED, BLUE], None, [BLUE]]
FULL = {"max_new_tokens": 6, "min_new_tokens": 6}  # every row the whole length: no early stop hides a difference


@functools.cache
def built(name: str):
    torch.manual_seed(0)
    if name == "toy":  # the shipped pretrained LLM and tower (the connector is fresh)
        model, processor = tinylmm.build("toy")
    else:
        model, processor = tinylmm.build("toy", [o for o in TINY if o.startswith("model.")])
        with torch.no_grad():  # larger random weights: freshly initialised, it repeats one token whatever the prompt
            for w in model.parameters():
                if w.dim() > 1:
                    w.normal_(0, 0.2)
    return model.eval(), processor


@pytest.fixture(params=["tiny", "toy"])
def model(request):
    return built(request.param)


def tokens(model, processor, prompts, images, **kwargs) -> list[list[int]]:
    """The new tokens of one left-padded batch, per row."""
    convs, pictures = prompt_inputs(prompts, images)
    encoded = [processor.prompt(c, p) for c, p in zip(convs, pictures)]
    return generate_tokens(model, processor, encoded, **kwargs).tolist()


def test_greedy_batched_equals_one_by_one_token_for_token(model):
    model, processor = model
    together = tokens(model, processor, PROMPTS, IMAGES, **FULL)
    alone = [tokens(model, processor, [p], [i], **FULL)[0] for p, i in zip(PROMPTS, IMAGES)]
    assert together == alone
    # answers depend on the prompt, so the comparison can fail (the pretrained toy answers two alike)
    assert len({tuple(t) for t in together}) >= len(PROMPTS) - 1
    texts = tinylmm.generate(model, processor, PROMPTS, IMAGES, batch_size=8, **FULL)
    assert texts == tinylmm.generate(model, processor, PROMPTS, IMAGES, batch_size=1, **FULL)
    assert texts == tinylmm.generate(model, processor, PROMPTS, IMAGES, batch_size=2, **FULL)  # other companions
    assert texts == [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in alone]


def test_cached_equals_uncached_and_uncached_recomputes(model):
    model, processor = model
    lengths = []

    def record(module, args, kw):  # the positions each step feeds the decoder
        lengths.append((kw["inputs_embeds"] if kw.get("input_ids") is None else kw["input_ids"]).shape[1])

    hook = model.llm.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        cached = tokens(model, processor, PROMPTS, IMAGES, use_cache=True, **FULL)
        n, lengths[:] = lengths[0], []
        uncached = tokens(model, processor, PROMPTS, IMAGES, use_cache=False, **FULL)
    finally:
        hook.remove()
    assert cached == uncached
    assert lengths == [n + step for step in range(6)]  # the whole sequence at every step: no cache
    assert tinylmm.generate(model, processor, PROMPTS, IMAGES, use_cache=False, **FULL) == tinylmm.generate(
        model, processor, PROMPTS, IMAGES, **FULL
    )


@pytest.mark.parametrize("use_cache", [True, False])
def test_position_ids_count_from_each_rows_first_token(model, use_cache):
    """Checked directly: under RoPE (both models here) a row's positions shifted by its padding
    give the same attention scores, so batched == one-by-one alone would not see wrong ones."""
    model, processor = model
    seen = []
    hook = model.llm.get_decoder().register_forward_pre_hook(
        lambda m, args, kw: seen.append((kw["position_ids"].clone(), kw["attention_mask"].clone())), with_kwargs=True
    )
    try:
        prompts, images = ["Shape?", "<image>\nWhat color is the circle?"], [None, RED]
        tokens(model, processor, prompts, images, max_new_tokens=2, min_new_tokens=2, use_cache=use_cache)
    finally:
        hook.remove()
    (first, mask), (second, _) = seen[:2]
    short = int(mask[0].sum())
    pad = mask.shape[1] - short
    assert pad > 0 and mask[0, :pad].sum() == 0  # left padding, masked
    assert first[0, pad:].tolist() == list(range(short)) and first[1].tolist() == list(range(mask.shape[1]))
    assert second[:, -1].tolist() == [short, mask.shape[1]]  # the next token continues each row's count


def test_text_only_and_single_prompt_forms(model):
    model, processor = model
    one = tinylmm.generate(model, processor, "<image>\nWhat color is the circle?", RED, **FULL)
    assert one == tinylmm.generate(model, processor, [PROMPTS[0]], [[RED]], **FULL)
    text_only = tinylmm.generate(model, processor, "Shape?", **FULL)
    assert text_only == tinylmm.generate(model, processor, ["Shape?"], **FULL)
    assert tinylmm.generate(model, processor, [], None) == []


def test_argument_errors_name_the_prompt(tmp_path):
    model, processor = built("tiny")
    gen = lambda prompts, images=None, **kw: tinylmm.generate(model, processor, prompts, images, max_new_tokens=1, **kw)  # noqa: E731
    with pytest.raises(ConfigError, match="prompt 2: 2 <image> in the text but 1 image"):
        gen(PROMPTS[:3], [RED, None, RED])
    with pytest.raises(ConfigError, match="prompt 1: 0 <image> in the text but 1 image"):
        gen(["<image>\nA?", "B?"], [RED, RED])
    with pytest.raises(ConfigError, match="prompt 0: 1 <image> in the text but 0 image"):
        gen("<image>\nA?")
    with pytest.raises(ConfigError, match="images has 1 entries for 2 prompts"):
        gen(["<image>\nA?", "B?"], [RED])
    with pytest.raises(ConfigError, match="images is one Image for 2 prompts"):
        gen(["<image>\nA?", "<image>\nB?"], RED)
    with pytest.raises(ConfigError, match=r"prompt 0 is one \('human', \.\.\.\) pair.*prompts=\[conversation\]"):
        gen([("human", "A?")])
    with pytest.raises(ConfigError, match="prompt 1, turn 0: unknown role 'humna' \\(did you mean 'human'\\?\\)"):
        gen(["A?", [("humna", "B?")]])
    with pytest.raises(ConfigError, match="prompt 0: the conversation ends with an assistant turn"):
        gen([[("human", "A?"), ("gpt", "B")]])
    with pytest.raises(ConfigError, match="prompt 0, image 1 is a int, not a PIL image or a path"):
        gen(["<image><image>A?"], [[RED, 3]])
    with pytest.raises(DataError, match="prompt 1, image 0: .*gone.png does not exist"):
        gen(["A?", "<image>\nB?"], [None, tmp_path / "gone.png"])
    with pytest.raises(ConfigError, match="batch_size must be at least 1, not 0"):
        gen("A?", batch_size=0)
    with pytest.raises(ConfigError, match="max_new_tokens must be at least 1, not 0"):
        tinylmm.generate(model, processor, "A?", max_new_tokens=0)
    RED.save(tmp_path / "red.png")  # a path is read as the image it names
    assert gen("<image>\nA?", tmp_path / "red.png") == gen("<image>\nA?", RED)


def test_eval_run_progress_shows_questions_per_second_and_eta():
    """`eval run`'s bar after 2 of 4 questions in 20 s: 0.1 questions/s, 20 s left."""
    from rich.console import Console

    from tinylmm.cli.evaluate import answering_progress

    now = [0.0]
    console = Console(file=(out := io.StringIO()), width=120, get_time=lambda: now[0])
    with answering_progress(console) as on_batch:
        for done in (1, 2):
            now[0] += 10.0
            on_batch(done, 4)
    text = out.getvalue()
    assert "2/4" in text and "0.1 questions/s" in text and "0:00:20" in text, text
