"""Every shipped preset, as a tiny random model of the same architecture classes and template:
forward with labels, backward, and generation through the chat path."""

import pytest
import torch
from PIL import Image

from tinylmm.catalog import zoo
from tinylmm.models.arch import arch_config
from tinylmm.models.assemble import build_model
from tinylmm.models.generation import chat_reply
from tinylmm.models.llm import supports_attention
from tinylmm.models.vision.openclip import build_openclip

from conftest import is_openclip, model_inputs, require_openclip
from tiny_presets import tiny_spec
from tiny_tokenizers import FAMILIES, family_tokenizer, model_token_ids

SHIPPED = [name for name, p in zoo.presets().items() if p.shipped]
TURNS = [
    ("human", "<image>\nWhat color is the circle?"),
    ("gpt", "red"),
    ("human", "And which shape is left?"),
    ("gpt", "the square"),
]


def tiny_preset(name: str):
    preset = zoo.get(name)
    spec = preset.model_spec()
    if is_openclip(spec.vision):
        require_openclip()
        import tiny_openclip  # noqa: F401 - registers the tiny towers
    if name == "toy":
        return preset, spec  # already tiny, with its built-in tokenizer
    family = preset.info.family
    tok_dir = family_tokenizer(family)
    ids = model_token_ids(tok_dir)
    vocab = ids.pop("vocab_size")
    return preset, tiny_spec(spec, tok_dir, vocab, ids)


def test_every_family_has_a_test_tokenizer():
    assert {zoo.get(n).info.family for n in SHIPPED} <= set(FAMILIES)


@pytest.mark.parametrize("name", SHIPPED)
def test_preset_trains_and_generates_as_a_tiny_model(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    preset, spec = tiny_preset(name)
    torch.manual_seed(0)
    model, proc = build_model(spec)
    # The same classes as the real preset: the real config's causal LM and vision tower.
    real_llm = arch_config(preset.model_spec().llm, "llm")
    real_cls = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(**real_llm))]
    assert type(model.llm) is real_cls
    real_spec = preset.model_spec().vision
    if is_openclip(real_spec):  # the tiny tower: open_clip's same tower class (timm's or its own ViT)
        real = build_openclip(real_spec, device="meta")
        assert type(model.vision.model.trunk if hasattr(model.vision.model, "trunk") else model.vision.model) is type(
            real.model.trunk if hasattr(real.model, "trunk") else real.model
        )
    else:
        assert model.vision.config.model_type == arch_config(real_spec, "vision")["model_type"]
        if real_spec.image_size is not None:  # DINOv2 at 224 px: the tiny tower interpolates its positions too
            assert model.vision.image_size == spec.vision.image_size < model.vision.config.image_size
    assert proc.template_name == spec.template
    # sdpa where the class has it; Gemma-2 (soft-capped scores) falls back to eager
    want = "sdpa" if supports_attention(model.llm.config, "sdpa") else "eager"
    assert model.llm.config._attn_implementation == want and (want == "sdpa") == (real_llm["model_type"] != "gemma2")

    image = Image.new("RGB", (48, 40), (220, 30, 30))
    enc = proc.encode(TURNS, num_images=1)
    assert enc.input_ids.count(model.image_token_id) == model.num_image_tokens
    out = model(**model_inputs(proc, enc, image))
    assert torch.isfinite(out.loss) and out.num_tokens > 0
    out.loss.backward()
    for part in (model.connector, model.llm, model.vision):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reaches the {part.__class__.__name__}"

    model.eval()
    answer = chat_reply(model, proc, TURNS[:1], [image], max_new_tokens=4)
    assert isinstance(answer, str)
    prompt = proc.prompt(TURNS[:1], [image])
    new = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, eos_token_id=proc.stop_token_ids)
    assert new.shape == (1, 4)
