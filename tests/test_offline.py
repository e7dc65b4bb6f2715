"""Offline first: every part of a preset can come from a local directory (`--llm`, `--vision`)."""

import os
import subprocess
import sys

import pytest
import torch

from tinylmm.config import ConfigError, resolve
from tinylmm.models.assemble import build_model
from tinylmm.models.loading import ModelNotFoundError

from conftest import TINY, tiny_stages
from test_models import SIGLIP


@pytest.fixture(scope="module")
def local_parts(tmp_path_factory):
    """A tiny LLaMA (with the toy tokenizer) and a tiny SigLIP tower, saved as a hub download would be."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from tinylmm.resources import asset

    root = tmp_path_factory.mktemp("local")
    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    )
    llm.save_pretrained(root / "llm")
    AutoTokenizer.from_pretrained(str(asset("toy/llm"))).save_pretrained(root / "llm")
    SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in SIGLIP.items() if k != "model_type"})).save_pretrained(
        root / "vision"
    )
    return root, llm


def test_llm_and_vision_flags_load_the_parts_from_directories(local_parts):
    root, llm = local_parts
    cfg, sources = resolve(
        "tinyllava-tinyllama-siglip-1.5b", "share", llm=str(root / "llm"), vision=str(root / "vision")
    )
    assert cfg.model.llm.name_or_path == cfg.model.llm.tokenizer == str(root / "llm")
    assert cfg.model.vision.name_or_path == str(root / "vision")
    assert sources["model.llm.name_or_path"] == "cli --llm" and sources["model.vision.name_or_path"] == "cli --vision"
    model, proc = build_model(cfg.model)
    # the weights are the directory's, not a random initialisation
    torch.testing.assert_close(model.llm.model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight)
    assert model.vision.image_size == 32 and model.num_image_tokens == 16


def test_a_flag_replaces_one_part_and_keeps_the_other(local_parts):
    root, _ = local_parts
    cfg, _ = resolve("toy", "share", llm=str(root / "llm"))
    assert cfg.model.llm.name_or_path == str(root / "llm") and cfg.model.llm.config is None
    assert cfg.model.vision.name_or_path == "builtin:toy-siglip"  # the part not named keeps the preset's


def test_an_override_still_wins_over_a_flag(local_parts):
    root, _ = local_parts
    cfg, _ = resolve("toy", "share", ["model.llm.tokenizer=builtin:toy"], llm=str(root / "llm"))
    assert cfg.model.llm.tokenizer == "builtin:toy"


def test_cli_trains_from_local_directories_and_a_missing_one_fails_fast(local_parts, tmp_path):
    root, _ = local_parts
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = [
        sys.executable,
        "-m",
        "tinylmm.cli.app",
        "train",
        "--preset",
        "tinyllava-tinyllama-siglip-1.5b",
        "--llm",
        str(root / "llm"),
        "--vision",
        str(root / "vision"),
        "--no-eval",
        "-o",
        str(tmp_path / "run"),
        *[o for o in TINY if not o.startswith("model.")],
        *tiny_stages(steps=1),
        "stages.pretrain.data={shapes: caption}",
        "stages.share.data={shapes: caption}",
        "stages.finetune.data={shapes: instruct}",
        "stages.share.tune.vision=partial:-1",
    ]
    out = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "finetune" / "final" / "tinylmm.json").exists()
    missing = subprocess.run(
        run[:6] + ["--llm", str(tmp_path / "nothing-here"), "-o", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert missing.returncode == 2 and "nothing-here" in missing.stderr and "--llm DIR" in missing.stderr


def test_resume_refuses_part_flags(tmp_path):
    from tinylmm.api import train_run

    with pytest.raises(ConfigError, match="--llm"):
        train_run(resume=tmp_path, llm="somewhere")


def test_missing_local_part_names_the_path(local_parts, tmp_path):
    root, _ = local_parts
    cfg, _ = resolve(
        "tinyllava-tinyllama-siglip-1.5b", "share", llm=str(root / "llm"), vision=str(tmp_path / "no-tower")
    )
    with pytest.raises(ModelNotFoundError, match="no-tower"):
        build_model(cfg.model)


def test_a_partial_index_past_the_tower_fails_before_the_first_stage(tmp_path):
    from tinylmm.api import train_run

    overrides = TINY + tiny_stages(steps=1) + ["stages.share.tune.vision=partial:12"]  # the tiny tower has 3 layers
    with pytest.raises(ConfigError, match="stages.share.tune.vision: partial:12"):
        train_run("toy", "share", overrides, output_dir=tmp_path / "run", evaluate=False)
    assert not (tmp_path / "run" / "pretrain").exists()  # stage 1 never ran


def test_vision_flag_on_an_open_clip_preset_names_its_weights():
    # the architecture stays open_clip's model config; the directory holds the weights
    cfg, sources = resolve("tinyllava-phi2-openclip-siglip-3.1b", "share", vision="/data/siglip-webli")
    assert cfg.model.vision.name_or_path == "open_clip:ViT-SO400M-14-SigLIP-384"
    assert cfg.model.vision.pretrained == "/data/siglip-webli" and sources["model.vision.pretrained"] == "cli --vision"
