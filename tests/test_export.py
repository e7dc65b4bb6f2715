"""`tinylmm export`: the zoo's LLM families as tiny random models with CLIP and SigLIP towers,
exported to transformers' LLaVA and loaded with plain transformers (AutoProcessor,
AutoModelForImageTextToText): the same input ids, pixel values, logits and greedy answers
as tinylmm's own; and what LLaVA cannot hold refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from tinylmm.catalog import zoo
from tinylmm.convert import hf_llava
from tinylmm.models.arch import arch_config
from tinylmm.models.assemble import build_model

from tiny_presets import tiny_spec, tiny_vision_config
from tiny_tokenizers import family_tokenizer, model_token_ids

FAMILY_PRESET = {  # one preset per LLM family of the zoo (its template, its LLM's config flags)
    "toy": "toy",
    "stablelm2": "tinyllava-stablelm2-siglip-2.0b",
    "tinyllama": "tinyllava-tinyllama-siglip-1.5b",
    "qwen2.5": "qwen2.5-0.5b-siglip-b-0.5b",
    "qwen3": "qwen3-0.6b-siglip-b-0.6b",
    "smollm2": "smollm2-1.7b-siglip-2.1b",
    "llama3.2": "llama3.2-1b-siglip-1.6b",
    "gemma2": "gemma2-2b-siglip-3.0b",
}
TOWERS = {"clip": "tinyllava-phi2-clip-3.0b", "siglip": "tinyllava-phi2-siglip-3.1b"}  # whose tower config
TURNS = [("human", "<image>\nWhat color is the circle?")]
IMAGE = Image.new("RGB", (48, 36), (220, 30, 30))  # not square: the padding runs


def test_every_zoo_family_is_exported_or_refused():
    families = {p.info.family for p in zoo.presets().values() if p.shipped}
    assert families == set(FAMILY_PRESET) | {"phi2"}  # phi2: refused, see test_phi2_lm_head_bias_is_refused


def tiny_model(family: str, tower: str, select: str = "patch"):
    preset = zoo.get(FAMILY_PRESET[family])
    spec = preset.model_spec()
    if family != "toy":
        tok = family_tokenizer(family)
        ids = model_token_ids(tok)
        spec = tiny_spec(spec, tok, ids.pop("vocab_size"), ids)
    tower_spec = zoo.get(TOWERS[tower]).model_spec().vision
    vision = dataclasses.replace(
        spec.vision,
        name_or_path=None,
        image_size=None,
        select=select,
        config=tiny_vision_config(arch_config(tower_spec, "vision")),
    )
    torch.manual_seed(0)
    model, proc = build_model(dataclasses.replace(spec, vision=vision))
    return model.eval(), proc


def hf_messages(question: str):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


CASES = [(f, t) for f in FAMILY_PRESET for t in TOWERS] + [("qwen2.5", "siglip-drop_first")]


@pytest.mark.parametrize("family,tower", CASES)
def test_export_loads_in_plain_transformers_with_the_same_outputs(family, tower, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    tower, _, select = tower.partition("-")
    model, proc = tiny_model(family, tower, select or "patch")
    notes = hf_llava.export(model, proc, tmp_path)
    assert any("visual tokens per image" in n for n in notes)
    cap = getattr(model.llm.config, "final_logit_softcapping", None)
    warnings = [n for n in notes if n.startswith("warning")]
    assert len(warnings) == (2 if family == "gemma2" else 0), notes

    hf_proc = AutoProcessor.from_pretrained(tmp_path)
    hf_model, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf_model).__name__ == "LlavaForConditionalGeneration"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf_model.eval()

    ours = proc.prompt(TURNS, [IMAGE])
    # tinylmm's prompt text; after the image, the space that stands for the word boundary a
    # Metaspace tokenizer marks where tinylmm tokenizes the text after an image on its own
    text, _ = proc.template.render(TURNS, proc.template.end_token(proc.tokenizer), True)
    separator = hf_llava.image_separator(proc.tokenizer)
    assert separator == (" " if family == "tinyllama" else "")
    messages = hf_messages("What color is the circle?")
    rendered = hf_proc.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == text.replace("<image>", "<image>" + separator)
    theirs = hf_proc.apply_chat_template(
        [
            {"role": m["role"], "content": [dict(c, image=IMAGE) if c["type"] == "image" else c for c in m["content"]]}
            for m in messages
        ],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"], atol=1e-5, rtol=0)

    with torch.no_grad():
        logits = model(**ours).logits
        hf_logits = hf_model(**theirs).logits
    if cap:  # Gemma-2: LLaVA's head does not soft-cap (the export's warning says by how much)
        assert "final_logit_softcapping" in warnings[0] and "vLLM" in warnings[1]
        assert (logits - hf_logits).abs().max() > 1e-6
        hf_logits = cap * torch.tanh(hf_logits / cap)
    diff = (logits - hf_logits).abs().max().item()
    assert diff < 1e-4, f"{family}/{tower}: max |logit difference| {diff:.3g}"

    stop = proc.stop_token_ids
    new = model.generate(**ours, max_new_tokens=6, eos_token_id=stop)
    hf_new = hf_model.generate(**theirs, max_new_tokens=6, do_sample=False)[:, theirs["input_ids"].shape[1] :]
    assert hf_new.tolist() == new.tolist()
