"""Tokenizers survive a save (issue 15): every writer of a tokenizer directory goes through
`Processor.save` -> `data.tokenizer_files.save_tokenizer` (run checkpoints via TinyLMM.save,
`convert`, `merge`, `export`), and the directory it writes reloads to the same ids and the
same special tokens, for every tokenizer kind of the zoo, as saved by the tests and under
the class its real hub files name, and for sentencepiece Llama tokenizers with both
`legacy` settings."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from tinylmm.data.processor import ImageProcessor, Processor
from tinylmm.data.tokenizer_files import TokenizerRoundTripError, check_reload, save_tokenizer

from tiny_tokenizers import FAMILIES, KINDS, TOY, cached_tokenizer

IMAGES = ImageProcessor(size=8, image_mean=[0.5] * 3, image_std=[0.5] * 3)

# The class each kind's real tokenizer_config.json names (transformers 5 rebuilds the
# pipeline of each from its constructor flags).
HUB_CLASS = {
    "gpt2": "CodeGenTokenizer",  # microsoft/phi-2
    "stablelm2": "GPT2Tokenizer",
    "llama2": "LlamaTokenizer",  # TinyLlama
    "qwen2.5": "Qwen2Tokenizer",
    "qwen3": "Qwen2Tokenizer",
    "smollm2": "GPT2Tokenizer",
    "llama3": "PreTrainedTokenizerFast",
    "gemma2": "GemmaTokenizer",
}
TEMPLATE_OF_KIND = {f.kind: f.template for f in FAMILIES.values()}


def variants():
    out = [pytest.param(kind, None, None, id=f"{kind}-as-saved") for kind in [*KINDS, TOY]]
    out += [pytest.param(kind, cls, None, id=f"{kind}-{cls}") for kind, cls in HUB_CLASS.items() if kind != "llama2"]
    out += [pytest.param("llama2", "LlamaTokenizer", legacy, id=f"llama2-legacy-{legacy}") for legacy in (True, False)]
    return out


def source_tokenizer(kind, cls, legacy, tmp_path):
    """A tokenizer directory of `kind`, its tokenizer_config.json naming `cls` and `legacy`."""
    src = tmp_path / "src"
    shutil.copytree(cached_tokenizer(kind), src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    if cls is not None:
        config["tokenizer_class"] = cls
    if legacy is not None:
        config["legacy"] = legacy
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(str(src))


def texts(tok):
    specials = sorted(set(tok.all_special_tokens))
    out = [
        "  leading and trailing whitespace \t ",
        "line one\nline two\n\n  indented\n",
        "non-ASCII: café naïve 東京 🙂 ½",
        "USER: What is in the image?\nASSISTANT: A red circle.",
    ]
    for s in specials:
        out += [f"USER: hi{s}USER: again", f"{s}USER:", f"a {s} b", f" {s}\n{s}é ", f"trailing{s}"]
    return out


def special_tokens(tok):
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    named = {n: (str(getattr(tok, n)), getattr(tok, n + "_id")) for n in names if getattr(tok, n) is not None}
    return named, sorted(zip(tok.all_special_tokens, tok.all_special_ids))


@pytest.mark.parametrize(("kind", "cls", "legacy"), variants())
def test_a_saved_tokenizer_reloads_to_the_same_ids_and_special_tokens(kind, cls, legacy, tmp_path):
    tok = source_tokenizer(kind, cls, legacy, tmp_path)
    if cls is not None:  # the class the hub files name is the one loaded
        assert type(tok).__name__ == ("TokenizersBackend" if cls == "PreTrainedTokenizerFast" else cls)
    proc = Processor(tok, IMAGES, TEMPLATE_OF_KIND[kind], 4)  # adds <image>, sets pad where missing
    proc.save(tmp_path / "ckpt")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt" / "tokenizer"))
    assert type(again) is type(tok)
    for text in texts(tok):
        for add in (True, False):
            assert again(text, add_special_tokens=add).input_ids == tok(text, add_special_tokens=add).input_ids, text
        assert again.tokenize(text) == tok.tokenize(text), text
    assert special_tokens(again) == special_tokens(tok)
    assert "<image>" in again.all_special_tokens
    # A two-turn conversation, as the model is trained on it, has the same ids.
    turns = [("human", "<image>\nWhat is it?"), ("gpt", "A red circle."), ("human", "And its colour?"), ("gpt", "Red.")]
    reloaded = Processor(again, IMAGES, TEMPLATE_OF_KIND[kind], 4)
    assert reloaded.encode(turns, num_images=1).input_ids == proc.encode(turns, num_images=1).input_ids


@pytest.mark.parametrize("legacy", [True, False])
def test_legacy_llama_keeps_its_handling_of_text_after_a_special_token(legacy, tmp_path):
    tok = source_tokenizer("llama2", "LlamaTokenizer", legacy, tmp_path)
    after_eos = tok.tokenize("</s>USER:")[1]
    assert after_eos == ("▁" if legacy else "U")  # legacy: "▁" is prepended to every segment
    save_tokenizer(tok, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["legacy"] is legacy
    assert AutoTokenizer.from_pretrained(str(tmp_path / "saved")).tokenize("</s>USER:")[1] == after_eos


def test_a_save_that_reloads_differently_is_an_error_naming_the_directory(tmp_path):
    tok = source_tokenizer("llama2", "LlamaTokenizer", True, tmp_path)
    saved = save_tokenizer(tok, tmp_path / "saved")
    config = json.loads((saved / "tokenizer_config.json").read_text())
    config["legacy"] = False  # what a plain save_pretrained leaves the reload with
    (saved / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerRoundTripError, match=r"saved.*reloads differently.*pipeline.*ids"):
        check_reload(tok, saved)


def test_convert_and_export_keep_a_legacy_tokenizers_multi_turn_ids(tmp_path):
    """The case the issue found: a TinyLLaVA_Factory checkpoint whose tokenizer_config.json
    says "legacy": true, converted and reloaded, gives the same two-turn prompt ids; so do
    its exports."""
    from tinylmm import api
    from tinylmm.convert import tinyllava

    from test_tinyllava import write_tinyllava

    src = write_tinyllava(tmp_path / "src", llm="llama", llm_model_name_or_path="TinyLlama/TinyLlama-1.1B-Chat-v1.0")[0]
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
    _, before, _ = tinyllava.build(src)
    assert before.tokenizer.tokenize("</s>USER:")[:2] == ["</s>", "▁"]  # legacy: "▁" after a special token
    tinyllava.convert(src, tmp_path / "out")
    _, after = api.load(tmp_path / "out")
    turns = [("human", "<image>\nWhat is it?"), ("gpt", "A circle."), ("human", "What color?")]
    want = before.encode(turns, num_images=1, add_generation_prompt=True).input_ids
    assert after.encode(turns, num_images=1, add_generation_prompt=True).input_ids == want
    # exported back to their layout (save_tokenizer too) and read again: still the same ids
    api.export_checkpoint(tmp_path / "out", tmp_path / "theirs", to="tinyllava")
    _, again, _ = tinyllava.build(tmp_path / "theirs")
    assert again.tokenizer.tokenize("</s>USER:")[:2] == ["</s>", "▁"]
    assert again.encode(turns, num_images=1, add_generation_prompt=True).input_ids == want
    # to transformers' LLaVA: AutoProcessor's tokenizer gives the same ids
    from transformers import AutoProcessor

    api.export_checkpoint(tmp_path / "out", tmp_path / "llava", to="hf-llava")
    llava_tok = AutoProcessor.from_pretrained(str(tmp_path / "llava")).tokenizer
    for text in texts(before.tokenizer):
        assert llava_tok(text).input_ids == before.tokenizer(text).input_ids, text
