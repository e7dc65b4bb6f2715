"""Conversation templates against a tokenizer of every LLM family (tests/tiny_tokenizers.py):
exactly the answers are supervised, the inference prompt is the training text up to the
answer, one BOS, generation stops at the end-of-turn token, and a template that does not
fit the tokenizer is an error naming both, never a dataset trained with every label masked."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from tinylmm.config import ConfigError, resolve
from tinylmm.data.llava import DataError, LlavaDataset
from tinylmm.data.processor import ImageProcessor, Processor, SampleError
from tinylmm.data.templates import (
    IGNORE_INDEX,
    ChatTemplate,
    TemplateError,
    get_template,
    tokenize_pieces,
    tokenize_with_labels,
)
from tinylmm.models.generation import CallbackStreamer, chat_reply, generate_batch

from conftest import model_inputs, supervised_runs
from tiny_tokenizers import FAMILIES, KINDS, QWEN25_SYSTEM, SMOLLM2_SYSTEM, family_tokenizer, make_tokenizer

IMAGES = ImageProcessor(size=8, image_mean=[0.5] * 3, image_std=[0.5] * 3)
N_IMG = 3  # positions per image
# An answer that also occurs in a question, one that is a word of Gemma's role header
# ("model"), and a multi-word one: answers are located, never searched for.
CONV = [
    ("human", "<image>\nIs the circle red or blue?"),
    ("gpt", "red"),
    ("human", "Which word names the model?"),
    ("gpt", "model"),
    ("human", "Where is the red circle?"),
    ("gpt", "At the top left, near the edge."),
]
ANSWERS = [v for r, v in CONV if r == "gpt"]
CAPTION = [("human", "<image>\nDescribe the image."), ("gpt", "A red circle at the top left.")]
AUTO = [f for f, fam in FAMILIES.items() if fam.template == "auto"]
# Qwen3 renders earlier answers without the (empty) think block its generation prompt opens.
THINK = "<think>\n\n</think>\n\n"
HISTORY_WITHOUT_THINK = {"qwen3"}


def tokenizer(family):
    return AutoTokenizer.from_pretrained(str(family_tokenizer(family)))


_PROCESSORS: dict = {}


def processor(family, template=None) -> Processor:
    key = (family, template)
    if key not in _PROCESSORS:
        _PROCESSORS[key] = Processor(tokenizer(family), IMAGES, template or FAMILIES[family].template, N_IMG)
    return _PROCESSORS[key]


def expected_span(family, answer):
    """What the model must generate after the prompt: TinyLLaVA's prompts end in "ASSISTANT:",
    so its answers start with the space; chat templates end their prompt at the answer."""
    fam = FAMILIES[family]
    return ("" if fam.template == "auto" else " ") + answer + fam.end_token


@pytest.mark.parametrize("family", list(FAMILIES))
def test_supervised_tokens_are_exactly_the_answers_and_end_tokens(family):
    proc = processor(family)
    tok, tpl = proc.tokenizer, proc.template
    text, spans = tpl.render(CONV, tpl.end_token(tok))
    assert [text[a:b] for a, b in spans] == [expected_span(family, a) for a in ANSWERS]
    # Token by token: a supervised token lies inside a span, every other token outside.
    _, offsets = tokenize_pieces(tok, text, tpl.add_special_tokens)
    ids, labels, per_span = tokenize_with_labels(tok, text, spans, tpl.add_special_tokens)
    assert all(per_span) and len(offsets) == len(labels)
    for (s, e), label in zip(offsets, labels):
        inside = [a <= s and e <= b for a, b in spans]
        outside = [e <= a or s >= b for a, b in spans]
        assert (label != IGNORE_INDEX and any(inside) and e > s) or (label == IGNORE_INDEX and all(outside)), (
            text[s:e],
            label,
        )
    # The processor's sample: the same supervised runs, each ending with the end-of-turn token.
    sample = proc.encode(CONV, num_images=1)
    decoded = [tok.decode(r) for r in supervised_runs(sample.input_ids, sample.labels)]
    assert [d.strip() for d in decoded] == [(a + FAMILIES[family].end_token) for a in ANSWERS]
    assert all(r[-1] == proc.end_token_id for r in supervised_runs(sample.input_ids, sample.labels))
    assert sample.input_ids.count(proc.image_token_id) == N_IMG
    assert all(lab == IGNORE_INDEX for i, lab in zip(sample.input_ids, sample.labels) if i == proc.image_token_id)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inference_prompt_is_the_training_text_up_to_the_answer(family):
    proc = processor(family)
    tpl = proc.template
    eos = tpl.end_token(proc.tokenizer)
    text, spans = tpl.render(CONV, eos)
    train = proc.encode(CONV, num_images=1)
    for k, (start, _) in enumerate(spans):
        history = CONV[: 2 * k + 1]
        prompt, _ = tpl.render(history, eos, add_generation_prompt=True)
        last = k == len(spans) - 1
        if family in HISTORY_WITHOUT_THINK and not last:
            # The documented choice: the training text is the template's own rendering, whose
            # history drops the think block; the prompt of the last answer agrees exactly.
            assert prompt == text[:start] + THINK
            continue
        assert prompt == text[:start]
        ids = proc.encode(history, num_images=1, add_generation_prompt=True).input_ids
        assert train.input_ids[: len(ids)] == ids  # the same tokens, not just the same text
        assert train.labels[len(ids) - 1] == IGNORE_INDEX and train.labels[len(ids)] != IGNORE_INDEX


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bos_exactly_once(family):
    proc = processor(family)
    tok, bos = proc.tokenizer, FAMILIES[family].bos
    for name, turns in [(proc.template_name, CONV), ("pretrain", CAPTION)]:
        tpl = proc.get_template(name)
        for prompt in (False, True):
            turns = turns[:1] if prompt else turns
            text, _ = tpl.render(turns, tpl.end_token(tok), add_generation_prompt=prompt)
            ids = proc.encode(turns, tpl, num_images=1, add_generation_prompt=prompt).input_ids
            if bos is not None:
                bos_id = tok.convert_tokens_to_ids(bos)
                assert ids[0] == bos_id and ids.count(bos_id) == 1, (name, prompt)
            else:  # nothing is put in front of the rendered text
                assert text.startswith(tok.decode(ids[:1])), (name, prompt)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pretrain_template_supervises_the_caption_and_newline(family):
    proc = processor(family)
    sample = proc.encode(CAPTION, proc.get_template("pretrain"), num_images=1)
    (run,) = supervised_runs(sample.input_ids, sample.labels)
    assert proc.tokenizer.decode(run).lstrip() == "A red circle at the top left.\n"
    assert sample.input_ids[sample.input_ids.index(proc.image_token_id) + N_IMG] == run[0]


@pytest.mark.parametrize("family", AUTO)
def test_chat_templates_render_the_documented_formats(family):
    text, _ = processor(family).template.render(CONV[:2], None)
    q, a = "<image>\nIs the circle red or blue?", "red"
    expected = {
        "qwen2.5": f"<|im_start|>system\n{QWEN25_SYSTEM}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
        f"<|im_start|>assistant\n{a}<|im_end|>\n",
        "smollm2": f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
        f"<|im_start|>assistant\n{a}<|im_end|>\n",
        "qwen3": f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{THINK}{a}<|im_end|>\n",
        "llama3.2": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December "
        f"2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{q}"
        f"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{a}<|eot_id|>",
        "gemma2": f"<bos><start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n{a}<end_of_turn>\n",
    }
    assert text == expected[family]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generation_stops_at_the_end_token_and_decodes_the_answer(family):
    proc = processor(family)
    end_id = proc.tokenizer.convert_tokens_to_ids(FAMILIES[family].end_token)
    assert proc.end_token_id == end_id and proc.stop_token_ids[0] == end_id
    # What the model is trained to generate for the last answer, replayed by a stand-in model.
    sample = proc.encode(CONV, num_images=1)
    answer_ids = supervised_runs(sample.input_ids, sample.labels)[-1]
    assert answer_ids[-1] == end_id
    model = Replay(answer_ids + [proc.tokenizer.pad_token_id])
    image = Image.new("RGB", (8, 8))
    out = generate_batch(model, proc, [CONV[:5]] * 2, [[image]] * 2)
    assert out == [ANSWERS[-1]] * 2
    assert model.kwargs["eos_token_id"] == proc.stop_token_ids and model.kwargs["pad_token_id"] is not None
    pieces = []
    assert chat_reply(model, proc, CONV[:5], [image], on_text=pieces.append) == ANSWERS[-1]
    assert "".join(pieces) == ANSWERS[-1]


class Replay:
    """Stands in for TinyLMM.generate: returns `new_ids` (streamed as generate() does: the
    embeddings-only prompt first, then token by token) and records the arguments."""

    def __init__(self, new_ids):
        self.new_ids = new_ids

    def generate(self, input_ids, attention_mask=None, pixel_values=None, streamer=None, **kwargs):
        self.kwargs = kwargs
        if streamer is not None:
            streamer.put(torch.empty(1, 0, dtype=torch.long))
            for i in self.new_ids:
                streamer.put(torch.tensor([i]))
            streamer.end()
        return torch.tensor([self.new_ids] * input_ids.shape[0])


def test_streamer_holds_back_incomplete_characters():
    tok = tokenizer("llama3.2")
    ids = tok("é ok", add_special_tokens=False)["input_ids"]
    pieces = []
    streamer = CallbackStreamer(tok, pieces.append)
    streamer.put(torch.empty(1, 0))
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(pieces) == "é ok" and all("\ufffd" not in p for p in pieces)


# ------------------------------------------------------------------ mismatches


def test_a_template_of_another_family_is_refused_naming_both():
    for family, template, suggestion in [
        ("tinyllama", "phi", "'llama'"),
        ("qwen2.5", "llama", "'auto'"),
        ("llama3.2", "phi", "'auto'"),
        ("phi2", "llama", "'phi'"),
    ]:
        with pytest.raises(TemplateError, match=f"template '{template}'.*{suggestion}") as err:
            Processor(tokenizer(family), IMAGES, template, N_IMG)
        assert str(family_tokenizer(family)) in str(err.value)


def test_auto_needs_a_chat_template():
    with pytest.raises(TemplateError, match="template 'auto'.*has none.*phi, llama") as err:
        Processor(tokenizer("phi2"), IMAGES, "auto", N_IMG)
    assert str(family_tokenizer("phi2")) in str(err.value)


def with_template(family, chat_template):
    tok = tokenizer(family)
    tok.chat_template = chat_template
    return tok


CHATML = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize(
    "family, chat_template, message",
    [
        # ChatML on a Llama-2 vocabulary: <|im_end|> is text, not a token
        ("tinyllama", CHATML, "does not start with a special token"),
        # a template that rewrites the answers
        ("qwen2.5", CHATML.replace("m.content", "m.content | upper"), "changes the text of an answer"),
        # role markers the vocabulary lacks, beside a real end token
        ("qwen2.5", CHATML.replace("'<|im_start|>'", "'<|im_begin|>'"), r"writes <\|im_begin\|>.*splits"),
        # a generation prompt that differs from how answers are rendered
        ("qwen2.5", CHATML.replace("assistant\\n' }}{%- endif", "assistant' }}{%- endif"), "generation prompt differs"),
        # a template that drops the answers
        ("qwen2.5", CHATML.replace("m.content", "(m.content if m.role == 'user' else 'ok')"), "every answer once"),
    ],
)
def test_a_chat_template_that_does_not_fit_is_refused(family, chat_template, message):
    with pytest.raises(TemplateError, match=message) as err:
        Processor(with_template(family, chat_template), IMAGES, "auto", N_IMG)
    assert "template 'auto'" in str(err.value) and str(family_tokenizer(family)) in str(err.value)


def test_text_role_markers_are_fine_when_the_family_uses_text():
    # TinyLlama-Chat's Zephyr format writes <|user|> as text and ends answers with </s>.
    proc = processor("tinyllama", "auto")
    assert proc.template.end_token(proc.tokenizer) == "</s>"
    sample = proc.encode(CONV, num_images=1)
    assert [proc.tokenizer.decode(r) for r in supervised_runs(sample.input_ids, sample.labels)] == [
        a + "</s>" for a in ANSWERS
    ]


def test_a_template_bound_to_another_tokenizer_is_refused():
    other = processor("qwen2.5").template
    with pytest.raises(TemplateError, match="bound to tokenizer"):
        processor("smollm2").encode(CONV, other, num_images=1)
    with pytest.raises(TemplateError, match="comes from a tokenizer"):
        get_template("auto")


def test_binding_needs_no_image_token_in_the_vocab_yet():
    # The probe's <image> is user text: the Processor adds the token, bind_template alone may not.
    from tinylmm.data.templates import bind_template

    assert bind_template("auto", tokenizer("gemma2")).eos == "<end_of_turn>"


def test_an_answer_the_chat_template_rewrites_is_a_sample_error():
    proc = processor("qwen3")
    with pytest.raises(SampleError, match="template mismatch.*changes the text"):
        proc.encode([("human", "<image>\nHi"), ("gpt", "thinking</think>red")], num_images=1)


def write_dataset(tmp_path, answers, image=True):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    question = {"from": "human", "value": "<image>\nWhat color?" if image else "What color?"}
    samples = [{"id": f"s{i}", "conversations": [question, {"from": "gpt", "value": a}]} for i, a in enumerate(answers)]
    for s in samples if image else ():
        s["image"] = "a.png"
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    return path


def test_a_dataset_with_every_sample_masked_is_refused(tmp_path):
    proc = processor("qwen3")
    path = write_dataset(tmp_path, ["x</think>red", "y</think>blue"])
    with pytest.raises(DataError, match="no sample .* supervised token under template 'auto' with tokenizer"):
        LlavaDataset(path, tmp_path, proc, proc.template, 256)
    # Too short for any answer: also every sample masked.
    path = write_dataset(tmp_path, ["red", "blue"], image=False)
    with pytest.raises(DataError, match="no sample .* supervised token.*max_len 12"):
        LlavaDataset(path, tmp_path, processor("qwen2.5"), processor("qwen2.5").template, 12)
    # Some usable: trained on, the rest reported.
    path = write_dataset(tmp_path, ["red", "y</think>blue"])
    ds = LlavaDataset(path, tmp_path, proc, proc.template, 256)
    assert len(ds) == 1 and ds.report.skipped[0][1].startswith("template mismatch")


def test_auto_is_a_known_template_name():
    cfg, _ = resolve("toy", "share", ["model.template=auto"])
    assert cfg.model.template == "auto"
    with pytest.raises(ConfigError, match="did you mean 'auto'"):
        resolve("toy", "share", ["model.template=autoo"])


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_auto_survives_save_and_load(family, tmp_path):
    proc = Processor(tokenizer(family), IMAGES, "auto", N_IMG)
    proc.save(tmp_path)
    again = Processor(AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer")), IMAGES, "auto", N_IMG)
    assert again.encode(CONV, num_images=1) == proc.encode(CONV, num_images=1)
    assert again.end_token_id == proc.end_token_id


def test_every_kind_builds_small_and_fast(tmp_path):
    import time

    for kind in KINDS:
        start = time.perf_counter()
        path = make_tokenizer(kind, tmp_path / kind)
        assert time.perf_counter() - start < 1.0
        tok = AutoTokenizer.from_pretrained(str(path))
        assert 256 < len(tok) < 512
        assert tok.decode(tok("Hello world\n 42", add_special_tokens=False)["input_ids"]) == "Hello world\n 42"


def test_auto_through_build_train_generate_save_load(tmp_path):
    from tinylmm.config import LLMSpec, ModelSpec, VisionSpec
    from tinylmm.models.assemble import build_model, load

    from test_models import SIGLIP
    from tiny_tokenizers import model_token_ids

    path = family_tokenizer("qwen3")
    cfg = dict(
        model_type="qwen2",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        **model_token_ids(path),
    )
    spec = ModelSpec(
        llm=LLMSpec(config=cfg, tokenizer=str(path)), vision=VisionSpec(config=dict(SIGLIP)), template="auto"
    )
    model, proc = build_model(spec)
    assert isinstance(proc.template, ChatTemplate) and proc.template.eos == "<|im_end|>"
    image = Image.new("RGB", (32, 32), (200, 10, 10))
    sample = proc.encode(CONV, num_images=1)
    out = model(**model_inputs(proc, sample, image))
    assert torch.isfinite(out.loss) and out.num_tokens == sum(1 for x in sample.labels[1:] if x != IGNORE_INDEX)
    assert len(generate_batch(model.eval(), proc, [CONV[:1]], [[image]], max_new_tokens=2)) == 1
    model.save(tmp_path / "ck", proc)
    _, again = load(tmp_path / "ck")
    assert isinstance(again.template, ChatTemplate) and again.encode(CONV, num_images=1) == sample
