"""`tinylmm export`: the zoo's LLM families as tiny random models with CLIP and SigLIP towers,
exported to transformers' LLaVA and loaded with plain transformers (AutoProcessor,
AutoModelForImageTextToText): the same input ids, pixel values, logits and greedy answers
as tinylmm's own; and what LLaVA cannot hold refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

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


# What vLLM's LLaVA loader reads (vllm/model_executor/models/llava.py, read, not run: vLLM is not
# installed here): weights under these prefixes (its hf_to_vllm_mapper maps the transformers-5
# names onto them, and its CLIP/SigLIP towers hold the transformer under `vision_model`);
# the tower built up to `vision_feature_layer` (`_get_layer_index`); image tokens per image
# its encoder info's count (CLIP grid**2 + 1, SigLIP grid**2) less 1 for `default`; the
# projector's activation one of its get_act_fn's (layers/activation.py).
VLLM_PREFIXES = (
    "language_model.model.",
    "language_model.lm_head.",
    "vision_tower.vision_model.",
    "multi_modal_projector.",
)
VLLM_ACTS = ("gelu", "gelu_fast", "gelu_new", "gelu_pytorch_tanh", "relu", "relu2", "silu", "quick_gelu")
VLLM_TOWER_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.layers.", "post_layernorm.")


def check_vllm_layout(out, text_arch: str):
    cfg = json.loads((out / "config.json").read_text())
    vision, layer = cfg["vision_config"], cfg["vision_feature_layer"]
    assert cfg["text_config"]["architectures"] == [text_arch]  # vLLM picks the LM class by it
    assert isinstance(layer, int) and cfg["vision_feature_select_strategy"] in ("default", "full")
    assert {"image_token_index", "multimodal_projector_bias"} <= set(cfg)
    assert cfg["projector_hidden_act"] in VLLM_ACTS
    layers = vision["num_hidden_layers"] + layer + 1 if layer < 0 else layer
    grid = vision["image_size"] // vision["patch_size"]
    tokens = grid**2 + (vision["model_type"] == "clip_vision_model")
    assert tokens - (cfg["vision_feature_select_strategy"] == "default") == cfg["image_seq_length"]
    if vision["model_type"] == "siglip_vision_model":
        assert vision["vision_use_head"] is False  # else vLLM builds a pooling head the file lacks
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(VLLM_PREFIXES) for k in keys), [k for k in keys if not k.startswith(VLLM_PREFIXES)]
    tower = [k.removeprefix("vision_tower.vision_model.") for k in keys if k.startswith("vision_tower.")]
    assert all(k.startswith(VLLM_TOWER_PARTS) for k in tower)
    assert {int(k.split(".")[2]) for k in tower if k.startswith("encoder.layers.")} == set(range(layers))
    assert {k for k in keys if k.startswith("multi_modal_projector.")} == {
        f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")
    }
    if not cfg["tie_word_embeddings"]:
        assert "language_model.lm_head.weight" in keys


def hf_messages(question: str):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def with_image(messages):
    """The messages with IMAGE in their image parts (what apply_chat_template(tokenize=True) loads)."""
    return [
        {**m, "content": [dict(c, image=IMAGE) if c["type"] == "image" else c for c in m["content"]]} for m in messages
    ]


# and the other selections: SigLIP without token 0 (LLaVA's `default`), CLIP with its CLS (`full`)
CASES = [(f, t) for f in FAMILY_PRESET for t in TOWERS] + [
    ("qwen2.5", "siglip-drop_first"),
    ("qwen2.5", "clip-cls_patch"),
]


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

    check_vllm_layout(tmp_path, type(model.llm).__name__)
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
        with_image(messages), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"], atol=1e-5, rtol=0)
    # a second turn: the first answer and its end token, then the next question
    history = TURNS + [("gpt", "It is red."), ("human", "And the square?")]
    more = with_image(messages) + [
        {"role": "assistant", "content": [{"type": "text", "text": "It is red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the square?"}]},
    ]
    two_turns = hf_proc.apply_chat_template(more, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert two_turns["input_ids"] == proc.prompt(history, [IMAGE])["input_ids"].tolist()

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


def test_weights_are_written_here_because_transformers_drops_vision_model(tmp_path):
    """Why the export writes its own safetensors: a LlavaForConditionalGeneration built in
    memory and saved by transformers 5 writes the tower as `vision_tower.embeddings.*`, a name
    vLLM's hf_to_vllm_mapper does not bring under its towers' `vision_model` (a model loaded
    from llava-hf names is saved back with them); the export keeps `vision_tower.vision_model.*`."""
    from transformers import AutoConfig, AutoModelForImageTextToText, LlavaForConditionalGeneration

    model, proc = tiny_model("qwen2.5", "siglip")
    hf_llava.export(model, proc, tmp_path / "ours")
    built = LlavaForConditionalGeneration(AutoConfig.from_pretrained(tmp_path / "ours"))
    built.load_state_dict(AutoModelForImageTextToText.from_pretrained(tmp_path / "ours").state_dict())
    built.save_pretrained(tmp_path / "theirs")
    keys = {}
    for name in ("ours", "theirs"):
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            keys[name] = {k for k in f.keys() if k.startswith("vision_tower.")}
    assert keys["ours"] and all(k.startswith("vision_tower.vision_model.") for k in keys["ours"])
    assert not any(k.startswith("vision_tower.vision_model.") for k in keys["theirs"])
    assert {k.replace("vision_tower.vision_model.", "vision_tower.") for k in keys["ours"]} == keys["theirs"]


# --------------------------------------------------------------------------- refused


def test_phi2_lm_head_bias_is_refused(tmp_path):
    spec = zoo.get("tinyllava-phi2-siglip-3.1b").model_spec()
    tok = family_tokenizer("phi2")
    ids = model_token_ids(tok)
    model, proc = build_model(tiny_spec(spec, tok, ids.pop("vocab_size"), ids))
    with pytest.raises(hf_llava.ExportError, match="LM head has a bias.*PhiForCausalLM.*--to tinyllava"):
        hf_llava.export(model, proc, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize(
    "change, message",
    [
        ({"connector": "resampler"}, "connector 'resampler' has no LLaVA equivalent"),
        ({"connector": "linear"}, "connector 'linear' has no LLaVA equivalent"),
        ({"vision": "dinov2"}, "the vision tower is a dinov2 model"),
        ({"template": "pretrain"}, "template 'pretrain' is for captions only"),
    ],
)
def test_what_llava_cannot_hold_is_refused(change, message, tmp_path):
    from tinylmm.config import resolve

    from conftest import TINY

    overrides = list(TINY)
    if "connector" in change:
        overrides.append(f"model.connector.type={change['connector']}")
    if "vision" in change:
        overrides.append(
            "model.vision.config={model_type: dinov2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,"
            " num_attention_heads: 2, image_size: 32, patch_size: 8}"
        )
    if "template" in change:
        overrides.append(f"model.template={change['template']}")
    cfg, _ = resolve("toy", "share", overrides)
    model, proc = build_model(cfg.model)
    with pytest.raises(hf_llava.ExportError, match=message):
        hf_llava.export(model, proc, tmp_path / "out")


def test_open_clip_tower_is_refused(tmp_path):
    from test_zoo_models import tiny_preset

    _, spec = tiny_preset("tinyllava-tinyllama-openclip-clip-1.3b")  # skips where open_clip is missing
    model, proc = build_model(spec)
    with pytest.raises(hf_llava.ExportError, match="open_clip tower.*CLIP or SigLIP tower only"):
        hf_llava.export(model, proc, tmp_path / "out")


def test_imported_tinyllava_model_exports_with_image_token_row_and_clip_crop(tmp_path):
    """A TinyLLaVA_Factory TinyLlama+CLIP model (`tinylmm convert`): its tokenizer fills the
    embedding table, so `<image>` gets a zero row (LLaVA looks it up before replacing it), and
    its CLIP preprocessing (square aspect) is the shortest edge + centre crop."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tinylmm.convert import tinyllava

    from test_tinyllava import write_tinyllava

    src, _, _ = write_tinyllava(tmp_path / "tl", llm="llama", vision="clip", aspect="square")
    model, proc, _ = tinyllava.build(src)
    model.eval()
    assert proc.image_processor.resize == "shortest_floor" and not proc.image_processor.pad_to_square
    rows = model.llm.get_input_embeddings().num_embeddings
    assert proc.image_token_id == rows  # past the table
    notes = hf_llava.export(model, proc, tmp_path / "out")
    assert any(f"embedding grown {rows} -> {rows + 1}" in n for n in notes)
    pre = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert pre["do_center_crop"] and pre["size"] == {"shortest_edge": 32} and not pre["do_pad"]
    hf_model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    hf_proc = AutoProcessor.from_pretrained(tmp_path / "out")
    ours = proc.prompt(TURNS, [IMAGE])
    theirs = hf_proc(
        images=IMAGE,
        text=hf_proc.apply_chat_template(hf_messages("What color is the circle?"), add_generation_prompt=True),
        return_tensors="pt",
    )
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"], atol=1e-5, rtol=0)
    with torch.no_grad():
        logits, hf_logits = model(**ours).logits, hf_model(**theirs).logits
    assert hf_logits.shape[-1] == rows + 1 and (hf_logits[..., rows] == 0).all()
    assert (logits - hf_logits[..., :rows]).abs().max() < 1e-4
    new = model.generate(**ours, max_new_tokens=6, eos_token_id=proc.stop_token_ids)
    assert hf_model.generate(**theirs, max_new_tokens=6)[:, ours["input_ids"].shape[1] :].tolist() == new.tolist()


# --------------------------------------------------------------------------- TinyLLaVA_Factory's layout

HUB_IDS = {  # what the presets are built from: TinyLLaVA_Factory rebuilds their configs from these names
    "phi2": "microsoft/phi-2",
    "stablelm2": "stabilityai/stablelm-2-zephyr-1_6b",
    "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "qwen2.5": "Qwen/Qwen2.5-0.5B",
    "clip": "openai/clip-vit-large-patch14-336",
    "siglip": "google/siglip-so400m-patch14-384",
}


def hub_named(model, family: str, tower: str):
    """The tiny model as if built from the preset's hub ids (the export writes the names)."""
    spec = model.spec
    model.spec = dataclasses.replace(
        spec,
        llm=dataclasses.replace(spec.llm, name_or_path=HUB_IDS[family]),
        vision=dataclasses.replace(spec.vision, name_or_path=HUB_IDS[tower]),
    )
    return model


def tiny_family_model(family: str, tower: str, template: str | None = None):
    if family in FAMILY_PRESET:
        model, proc = tiny_model(family, tower)
    else:  # phi2: refused by hf-llava, exported to TinyLLaVA_Factory
        preset = zoo.get(TOWERS[tower])
        tok = family_tokenizer(family)
        ids = model_token_ids(tok)
        torch.manual_seed(0)
        model, proc = build_model(tiny_spec(preset.model_spec(), tok, ids.pop("vocab_size"), ids))
    if template is not None:
        from tinylmm.data.processor import Processor

        model.spec = dataclasses.replace(model.spec, template=template)
        proc = Processor(proc.tokenizer, proc.image_processor, template, proc.num_image_tokens)
    return hub_named(model.eval(), family, tower), proc


@pytest.mark.parametrize(
    "family,tower,template",
    [(f, t, None) for f in ("phi2", "stablelm2", "tinyllama") for t in TOWERS] + [("qwen2.5", "siglip", "tinyllava")],
)
def test_tinyllava_export_converts_back_to_the_same_model(family, tower, template, tmp_path):
    from tinylmm.convert import tinyllava, tinyllava_export

    model, proc = tiny_family_model(family, tower, template)
    notes = tinyllava_export.export(model, proc, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["llm_model_name_or_path"] == HUB_IDS[family] and cfg["vision_model_name_or_path"] == HUB_IDS[tower]
    assert cfg["image_aspect_ratio"] == "pad" and cfg["connector_type"] == "mlp2x_gelu"
    # their `patch` drops token 0 (CLIP's CLS), `cls_patch` keeps all (SigLIP has no CLS)
    assert cfg["vision_feature_select_strategy"] == ("patch" if tower == "clip" else "cls_patch")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
        assert "connector._connector.0.weight" in f.keys() and "connector._connector.2.weight" in f.keys()
    assert prefixes == {"language_model", "vision_tower", "connector"}
    assert any(f"template '{proc.template_name}'" in n for n in notes)

    back, back_proc, _ = tinyllava.build(tmp_path / "out")
    back.eval()
    assert back_proc.template_name == proc.template_name
    assert back.num_image_tokens == model.num_image_tokens
    ours, theirs = proc.prompt(TURNS, [IMAGE]), back_proc.prompt(TURNS, [IMAGE])
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"], atol=1e-5, rtol=0)
    with torch.no_grad():
        diff = (model(**ours).logits - back(**theirs).logits).abs().max().item()
    assert diff < 1e-4, f"{family}/{tower}: max |logit difference| {diff:.3g}"
    stop = proc.stop_token_ids
    assert (
        back.generate(**theirs, max_new_tokens=6, eos_token_id=stop).tolist()
        == model.generate(**ours, max_new_tokens=6, eos_token_id=stop).tolist()
    )


@pytest.mark.parametrize(
    "family,message",
    [
        ("qwen3", "the LLM is a qwen3 model: TinyLLaVA_Factory's LLMFactory has no class for it"),
        ("llama3.2", "template 'auto' is not one of TinyLLaVA_Factory's USER/ASSISTANT formats"),
        ("toy", "the LLM was built from builtin:toy-llm.*the word 'tinyllama'"),
    ],
)
def test_tinyllava_export_refuses_what_their_framework_would_run_differently(family, message, tmp_path):
    from tinylmm.convert import tinyllava_export

    model, proc = tiny_model(family, "siglip")
    if family != "toy":
        model = hub_named(model, "tinyllama", "siglip")  # names are not what is refused here
    with pytest.raises(hf_llava.ExportError, match=message):
        tinyllava_export.export(model, proc, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the command


def test_export_command_writes_the_model_and_refuses_with_exit_2(tmp_path):
    from test_cli import tinylmm

    model, proc = tiny_model("qwen2.5", "clip")
    model.save(tmp_path / "ckpt", proc)
    done = tinylmm("export", str(tmp_path / "ckpt"), str(tmp_path / "llava"), "--to", "hf-llava")
    assert done.returncode == 0, done.stderr
    assert "exported model" in done.stdout and (tmp_path / "llava" / "chat_template.jinja").exists()
    assert json.loads((tmp_path / "llava" / "config.json").read_text())["model_type"] == "llava"
    refused = tinylmm("export", str(tmp_path / "ckpt"), str(tmp_path / "tl"), "--to", "tinyllava")
    assert refused.returncode == 2 and "template 'auto'" in refused.stderr
    assert not (tmp_path / "tl").exists()
