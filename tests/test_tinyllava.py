"""Importing TinyLLaVA_Factory checkpoints.

Each test writes a tiny checkpoint in their layout (config.json with their keys,
safetensors with their weight names, the tokenizer beside them) and checks that tinylmm
reproduces what their code computes. The reference below follows their modeling code
(tinyllava/model/modeling_tinyllava.py, vision_tower/base.py, connector/mlp.py,
data/template/base.py, data/image_preprocess.py) with plain transformers classes.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import tinylmm
from tinylmm.config import ConfigError, VisionSpec
from tinylmm.convert import tinyllava
from tinylmm.convert.tinyllava import NotTinyLLaVAError, convert
from tinylmm.data.templates import TINYLLAVA_SYSTEM, TemplateError
from tinylmm.models.vision import build_vision

QUESTION = "What is in the picture?"
THEIR_PROMPT = f"{TINYLLAVA_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"  # their phi/llama format, eval mode
IMAGE_TOKEN_INDEX = -200
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
CORPUS = [TINYLLAVA_SYSTEM, QUESTION, "A red circle and a blue square.", "ASSISTANT: USER: <image>\n"] * 4


# --------------------------------------------------------------------------- their side


def gpt2_style_tokenizer():
    """Byte-level BPE whose eos is <|endoftext|> and that adds no bos (Phi-2, Qwen2, StableLM-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def llama_style_tokenizer(legacy=False):
    """Sentencepiece-style (Metaspace, byte fallback, bos added), like TinyLlama's: with
    legacy=False the word-boundary mark is prefixed only at the start of a text."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    for ch in ["▁"] + sorted(set("".join(CORPUS)) - {" ", "\n"}):
        vocab.setdefault(ch, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=[], legacy=legacy, add_bos_token=True)


def tokenizer_image_token(prompt, tokenizer):
    """Their tokenizer_image_token (data/template/base.py): each piece around <image> on its own,
    -200 in between, the first piece's bos kept once."""
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    offset = 1 if chunks[0][:1] == [tokenizer.bos_token_id] else 0
    ids = chunks[0][:offset]
    separator = [IMAGE_TOKEN_INDEX] * (offset + 1)
    for x in [x for chunk in chunks for x in (chunk, separator)][:-1]:  # each stripped of `offset` tokens
        ids += x[offset:]
    return ids


def their_pixels(image, family, aspect):
    """data/image_preprocess.py: expand2square with the processor's mean (int(x*255)) for
    "pad", then the tower's image processor (their transformers used the PIL ones)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    size = VISION["image_size"]
    if family == "siglip":
        proc = SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        proc = CLIPImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
    if aspect == "pad" and image.width != image.height:
        side = max(image.size)
        canvas = Image.new(image.mode, (side, side), tuple(int(x * 255) for x in proc.image_mean))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    return proc(image, return_tensors="pt")["pixel_values"][0]


class Theirs:
    """TinyLlavaForConditionalGeneration's computation with plain transformers modules."""

    def __init__(self, llm, vision, connector, layer, select):
        self.llm, self.vision, self.connector, self.layer, self.select = llm, vision, connector, layer, select

    def embeds(self, ids, pixels):
        feats = self.vision(pixels[None], output_hidden_states=True).hidden_states[self.layer]
        feats = feats[:, 1:] if self.select == "patch" else feats  # vision_tower/base.py
        image = self.connector(feats)[0]
        at = ids.index(IMAGE_TOKEN_INDEX)
        text = self.llm.get_input_embeddings()(torch.tensor(ids[:at] + ids[at + 1 :]))
        return torch.cat([text[:at], image, text[at:]])[None]  # spliced where -200 sat

    @torch.no_grad()
    def logits(self, ids, pixels):
        return self.llm(inputs_embeds=self.embeds(ids, pixels)).logits

    @torch.no_grad()
    def generate(self, ids, pixels, **kw):
        embeds = self.embeds(ids, pixels)
        return self.llm.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), **kw
        )


def write_tinyllava(
    root,
    *,
    llm="phi",
    vision="siglip",
    select="patch",
    aspect="square",
    connector="mlp2x_gelu",
    layout="safetensors",
    seed=0,
    **config_changes,
):
    """A TinyLLaVA_Factory checkpoint directory; returns it and the reference model."""
    from safetensors.torch import save_file
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        PhiConfig,
        PhiForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(seed)
    root.mkdir(parents=True)
    tok = gpt2_style_tokenizer() if llm == "phi" else llama_style_tokenizer()
    tok.save_pretrained(root)
    if llm == "phi":  # the tokenizer is smaller than the embedding table, as Phi-2's
        text = dict(
            model_type="phi",
            vocab_size=len(tok) + 30,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            partial_rotary_factor=0.5,
            max_position_embeddings=512,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        lm = PhiForCausalLM(PhiConfig(**{k: v for k, v in text.items() if k != "model_type"}))
    else:  # exactly the tokenizer's size, tied head: <image> lies past the table
        text = dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        )
        lm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in text.items() if k != "model_type"}))
    vis_type = f"{vision}_vision_model"
    tower = (
        SiglipVisionModel(SiglipVisionConfig(**VISION))
        if vision == "siglip"
        else CLIPVisionModel(CLIPVisionConfig(**VISION))
    )
    first = nn.Linear(VISION["hidden_size"], 64)
    conn = nn.Sequential(first, nn.GELU(), nn.Linear(64, 64)) if connector == "mlp2x_gelu" else first

    state = {
        f"language_model.{k}": v
        for k, v in lm.state_dict().items()
        if not (text.get("tie_word_embeddings") and k == "lm_head.weight")
    }
    # transformers 4.x, which wrote their checkpoints, nested the tower under vision_model.
    state.update({f"vision_tower._vision_tower.vision_model.{k}": v for k, v in tower.state_dict().items()})
    state.update({f"connector._connector.{k}": v for k, v in conn.state_dict().items()})
    state = {k: v.contiguous().clone() for k, v in state.items()}
    if layout == "safetensors":
        save_file(state, str(root / "model.safetensors"))
    elif layout == "shards":
        keys = sorted(state)
        shards = {
            "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
        }
        for name, part in shards.items():
            save_file({k: state[k] for k in part}, str(root / name))
        index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        torch.save(state, root / "pytorch_model.bin")

    config = {  # the keys and shapes of their config.json (e.g. TinyLLaVA-Phi-2-SigLIP-3.1B)
        "architectures": ["TinyLlavaForConditionalGeneration"],
        "model_type": "tinyllava",
        "cache_dir": None,
        "connector_type": connector,
        "hidden_size": 64,
        "ignore_index": -100,
        "image_aspect_ratio": aspect,
        "image_token_index": -200,
        "llm_model_name_or_path": f"org/{llm}",
        "num_queries": 128,
        "num_resampler_layers": 3,
        "pad_token": tok.eos_token,
        "pad_token_id": tok.eos_token_id,
        "resampler_hidden_size": 768,
        "text_config": {
            "_name_or_path": f"org/{llm}",
            "architectures": [type(lm).__name__],
            "auto_map": {"AutoConfig": "org/remote--configuration.Config"},
            "torch_dtype": "float32",
            **text,
        },
        "tokenizer_model_max_length": 2048,
        "tokenizer_name_or_path": f"org/{llm}",
        "tokenizer_padding_side": "right",
        "tokenizer_use_fast": False,
        "torch_dtype": "float32",
        "transformers_version": "4.39.3",
        "tune_type_connector": "full",
        "tune_type_llm": "full",
        "tune_type_vision_tower": "frozen",
        "tune_vision_tower_from_layer": 0,
        "use_cache": True,
        "vision_config": {
            "model_type": vis_type,
            "model_name_or_path": f"org/{vision}",
            "model_name_or_path2": "",
            **VISION,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": select,
        "vision_hidden_size": 32,
        "vision_model_name_or_path": f"org/{vision}",
        "vision_model_name_or_path2": "",
        "vocab_size": text["vocab_size"],
    }
    config.update(config_changes)
    (root / "config.json").write_text(json.dumps(config))
    their_tok = type(tok).from_pretrained(root)
    return root, Theirs(lm.eval(), tower.eval(), conn.eval(), -2, select), their_tok


# --------------------------------------------------------------------------- the select rule


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_drop_first_drops_token_zero_whatever_it_is(family):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    full = (
        SiglipVisionModel(SiglipVisionConfig(**VISION))
        if family == "siglip"
        else CLIPVisionModel(CLIPVisionConfig(**VISION))
    ).eval()
    tower = build_vision(VisionSpec(config=dict(VISION, model_type=f"{family}_vision_model"), select="drop_first"))
    tower.model.load_state_dict({k: v for k, v in full.state_dict().items() if k in tower.model.state_dict()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = full(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = tower(x)
    # SigLIP: 16 patches, no CLS -> 15 (a real patch goes); CLIP: CLS + 16 -> 16, as `patch`
    assert tower.num_patches == got.shape[1] == {"siglip": 15, "clip": 16}[family]
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- tokenization


@pytest.mark.parametrize(
    "make",
    [gpt2_style_tokenizer, llama_style_tokenizer, lambda: llama_style_tokenizer(True)],
    ids=["gpt2-style", "llama-style", "llama-legacy"],
)
def test_prompt_ids_equal_their_tokenizer_image_token(make):
    from tinylmm.data.processor import ImageProcessor, Processor

    theirs = tokenizer_image_token(THEIR_PROMPT, make())
    # their formats render the same prompt and differ in the end token only: `tinyllava` takes the tokenizer's eos
    proc = Processor(make(), ImageProcessor(32, [0.5] * 3, [0.5] * 3), "tinyllava", num_image_tokens=3)
    ids = proc.encode([("human", f"<image>\n{QUESTION}")], add_generation_prompt=True).input_ids
    assert ids == [i for t in theirs for i in ([proc.image_token_id] * 3 if t == IMAGE_TOKEN_INDEX else [t])]


# --------------------------------------------------------------------------- convert and load

CASES = {  # llm, vision, select, aspect, connector, weight layout
    "phi-siglip": ("phi", "siglip", "patch", "square", "mlp2x_gelu", "safetensors"),
    "llama-clip-pad-shards": ("llama", "clip", "patch", "pad", "mlp2x_gelu", "shards"),
    "llama-siglip-cls_patch-linear": ("llama", "siglip", "cls_patch", "pad", "linear", "bin"),
    "phi-clip-square": ("phi", "clip", "patch", "square", "mlp2x_gelu", "safetensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_reproduces_their_outputs(case, tmp_path):
    llm, vision, select, aspect, connector, layout = CASES[case]
    src, theirs, their_tok = write_tinyllava(
        tmp_path / "theirs", llm=llm, vision=vision, select=select, aspect=aspect, connector=connector, layout=layout
    )
    out, notes = convert(src, tmp_path / "ours")
    model, proc = tinylmm.load(out)
    assert proc.template_name == {"phi": "phi", "llama": "llama"}[llm]
    n_tokens = 16 + (vision == "clip") - (select == "patch")
    assert model.num_image_tokens == n_tokens and any(f"{n_tokens} visual tokens" in n for n in notes)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 47, 3), dtype=np.uint8))
    turns = [("human", f"<image>\n{QUESTION}")]
    text, _ = proc.template.render(turns, proc.template.end_token(proc.tokenizer), add_generation_prompt=True)
    assert text == THEIR_PROMPT
    batch = proc.prompt(turns, [image])
    pixels = their_pixels(image, vision, aspect)
    torch.testing.assert_close(batch["pixel_values"][0], pixels)

    ids = tokenizer_image_token(THEIR_PROMPT, their_tok)
    expanded = [i for t in ids for i in ([model.image_token_id] * n_tokens if t == IMAGE_TOKEN_INDEX else [t])]
    assert batch["input_ids"][0].tolist() == expanded
    with torch.no_grad():
        ours = model(**batch).logits
    want = theirs.logits(ids, pixels)
    assert ours.shape == want.shape  # no extra <image> column: the LLM kept its vocabulary
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)

    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=their_tok.eos_token_id)
    assert model.generate(**batch, **kw).tolist() == theirs.generate(ids, pixels, **kw).tolist()


def test_load_converts_a_tinyllava_directory_in_memory(tmp_path):
    src, theirs, their_tok = write_tinyllava(tmp_path / "theirs", llm="llama", vision="siglip")
    model, proc = tinylmm.load(src)
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    batch = proc.prompt([("human", f"<image>\n{QUESTION}")], [image])
    ids = tokenizer_image_token(THEIR_PROMPT, their_tok)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**batch).logits, theirs.logits(ids, their_pixels(image, "siglip", "square")), rtol=1e-4, atol=1e-4
        )
    assert not (src / "tinylmm.json").exists()  # nothing written into their directory


def test_cli_convert_then_chat(tmp_path):
    from typer.testing import CliRunner

    from tinylmm.cli.app import app

    src, _, _ = write_tinyllava(tmp_path / "theirs")
    out = tmp_path / "ours"
    runner = CliRunner()
    result = runner.invoke(app, ["convert", "--from", "tinyllava", str(src), str(out)])
    assert result.exit_code == 0, result.output
    assert "converted model" in result.output and "template 'phi'" in result.output
    meta = json.loads((out / "tinylmm.json").read_text())
    assert meta["format"] == "tinylmm/2" and meta["model"]["vision"]["select"] == "drop_first"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / "blue.png")
    image = str(tmp_path / "blue.png")
    result = runner.invoke(app, ["chat", str(out), "--image", image, "--max-new-tokens", "3", "hi"])
    assert result.exit_code == 0, result.output

    again = runner.invoke(app, ["convert", "--from", "tinyllava", str(src), str(out)])
    assert isinstance(again.exception, FileExistsError)  # never clobbers
    assert runner.invoke(app, ["convert", "--from", "llava", str(src), str(tmp_path / "x")]).exit_code == 2


def test_template_follows_the_tokenizers_eos_or_the_override(tmp_path):
    src, _, tok = write_tinyllava(tmp_path / "theirs")
    tok.eos_token = "<|im_end|>"  # their qwen2_instruct pairing
    tok.add_special_tokens({"eos_token": "<|im_end|>"})
    tok.save_pretrained(tmp_path / "qwen-tok")
    _, proc, _ = tinyllava.build(src, tokenizer=tmp_path / "qwen-tok")
    assert proc.template_name == "tinyllava" and proc.template.end_token(proc.tokenizer) == "<|im_end|>"
    _, proc, _ = tinyllava.build(src, template="tinyllava")
    assert proc.template_name == "tinyllava"
    with pytest.raises(TemplateError, match="'llama' ends each answer with '</s>'"):
        tinyllava.build(src, template="llama")  # a template of another family is refused, never trained on
    with pytest.raises(ConfigError, match="did you mean 'phi'"):
        tinyllava.build(src, template="phy")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "change, message",
    [
        ({"connector_type": "resampler"}, "connector_type='resampler'"),
        ({"connector_type": "mlp3x_gelu"}, "connector_type='mlp3x_gelu'"),
        ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy='full'"),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio='anyres'"),
        ({"vision_model_name_or_path2": "org/dinov2"}, "vision_model_name_or_path2"),
        ({"vision_config": {"model_type": "dinov2", **VISION}}, "vision_config.model_type='dinov2'"),
        ({"text_config": {"model_type": "openelm"}}, "text_config.model_type='openelm'"),
        ({"mystery_key": 1}, "mystery_key"),
        ({"vision_feature_layer": 7}, "vision_feature_layer=7 is outside the vision tower's 3 layers"),
    ],
)
def test_unsupported_values_name_the_key(change, message, tmp_path):
    src, _, _ = write_tinyllava(tmp_path / "theirs", **change)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        convert(src, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_not_a_tinyllava_checkpoint(tmp_path):
    with pytest.raises(NotTinyLLaVAError, match="no config.json"):
        convert(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(NotTinyLLaVAError, match="model_type 'llava', expected 'tinyllava'"):
        convert(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not a tinylmm checkpoint"):
        tinylmm.load(tmp_path)  # a directory of neither kind


def test_missing_or_foreign_weights_and_existing_out(tmp_path):
    src, _, _ = write_tinyllava(tmp_path / "theirs")
    (tmp_path / "ours").mkdir()
    with pytest.raises(FileExistsError, match="not overwriting"):
        convert(src, tmp_path / "ours")
    (src / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        convert(src, tmp_path / "new")

    from safetensors.torch import save_file

    src2, theirs, _ = write_tinyllava(tmp_path / "theirs2")
    save_file(
        {"language_model.lm_head.weight": torch.zeros(1), "mm_projector.0.weight": torch.zeros(1)},
        str(src2 / "model.safetensors"),
    )
    with pytest.raises(ConfigError, match="'mm_projector.0.weight' belongs to none"):
        convert(src2, tmp_path / "new")


def test_missing_tokenizer_names_theirs(tmp_path):
    src, _, _ = write_tinyllava(tmp_path / "theirs")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_name_or_path='org/phi'.*--tokenizer"):
        convert(src, tmp_path / "ours")


def test_half_precision_weights_stay_half(tmp_path):
    from safetensors.torch import load_file, save_file

    src, _, _ = write_tinyllava(tmp_path / "theirs")
    state = load_file(str(src / "model.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(src / "model.safetensors"))
    out, _ = convert(src, tmp_path / "ours")
    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values()} == {torch.float16}
    for path in (out, src):  # in memory as from the converted checkpoint: the LLM as stored, the rest fp32
        model, _ = tinylmm.load(path)
        assert model.llm.dtype == torch.float16
        assert {p.dtype for p in [*model.vision.parameters(), *model.connector.parameters()]} == {torch.float32}


def test_their_patch_rule_gives_728_tokens_for_siglip_so400m_384():
    from tinylmm.resources import asset

    config = json.loads(asset("arch/google--siglip-so400m-patch14-384.json").read_text())
    with torch.device("meta"):
        tower = build_vision(VisionSpec(config=config, select="drop_first"))
        patch = build_vision(VisionSpec(config=config, select="patch"))
    assert (tower.num_patches, patch.num_patches) == (728, 729)
