"""open_clip vision towers (`name_or_path: open_clip:<model>`) on tiny random ViTs.

The tiny model configs are registered through open_clip's own API for custom configs
(`open_clip.add_model_config`, tests/openclip_configs/); the timm ViTs two of them name are
registered with timm's `register_model`, as timm's SigLIP entrypoints build theirs.
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import require_openclip

open_clip = require_openclip()

from test_memory import LLAMA_MID as MID  # noqa: E402
from test_memory import SIGLIP_MID  # noqa: E402

from tinylmm import memory as mem  # noqa: E402
from tinylmm.config import ConfigError, ConnectorSpec, LLMSpec, ModelSpec, VisionSpec, resolve  # noqa: E402
from tinylmm.data.processor import ImageProcessor  # noqa: E402
from tinylmm.models.assemble import build_model, load  # noqa: E402
from tinylmm.models.loading import ModelNotFoundError  # noqa: E402
from tinylmm.models.vision.openclip import OpenCLIPTower, build_openclip, visual_parameter_count  # noqa: E402
from tinylmm.train import measure  # noqa: E402

import tiny_openclip  # noqa: E402,F401 - registers the tiny towers

MiB = 2**20

# name -> prefix tokens (class token, registers)
TOWERS = {"tinylmm-test-siglip": 0, "tinylmm-test-clip": 1, "tinylmm-test-reg": 3}
LLM = dict(
    model_type="llama",
    vocab_size=520,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)


def vision(name, **kw) -> VisionSpec:
    return VisionSpec(name_or_path=f"open_clip:{name}", **kw)


def spec(name="tinylmm-test-siglip", **kw) -> ModelSpec:
    return ModelSpec(
        llm=LLMSpec(config=dict(LLM), tokenizer="builtin:toy"),
        vision=vision(name, **kw),
        connector=ConnectorSpec(type="mlp2x_gelu"),
        template="llama",
    )


# --------------------------------------------------------------------------- the tower


@pytest.mark.parametrize("name", list(TOWERS))
@pytest.mark.parametrize("layer", [-2, -1, 1])
@pytest.mark.parametrize("select", ["patch", "cls_patch"])
def test_features_are_the_full_towers_block_output(name, layer, select):
    torch.manual_seed(0)
    full = open_clip.create_model(name).visual.eval()  # the whole CLIP model's image tower
    tower = build_openclip(vision(name, feature_layer=layer, select=select)).eval()
    result = tower.model.load_state_dict(full.state_dict(), strict=False)
    assert not result.missing_keys
    blocks = full.trunk.blocks if hasattr(full, "trunk") else full.transformer.resblocks
    seen = []
    blocks[layer if layer < 0 else layer - 1].register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full(x)  # its own forward, pooling head included
        got = tower(x)
    prefix = TOWERS[name]
    want = seen[0] if select == "cls_patch" else seen[0][:, prefix:]
    torch.testing.assert_close(got, want)
    assert got.shape[1] == tower.num_patches == 16 + (prefix if select == "cls_patch" else 0)
    assert tower.has_cls == (prefix > 0) and tower.tower_tokens == 16 + prefix
    assert len(tower.layers) == {-2: 2, -1: 3, 1: 1}[layer]
    # no parameter without a gradient (DDP): the blocks after the feature layer, the final
    # norm and the pooling / projection head are gone
    tower.train()
    tower(x).square().sum().backward()
    assert [n for n, p in tower.named_parameters() if p.grad is None] == []
    assert tower.hidden_size == 32 and tower.image_size == 32 and tower.spec.feature_layer == -1


def test_unknown_names_and_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(
        ConfigError, match="unknown open_clip model 'ViT-SO400M-14-SigLIP-348'.*did you mean 'ViT-SO400M-14-SigLIP-3"
    ):
        build_openclip(vision("ViT-SO400M-14-SigLIP-348"))
    with pytest.raises(ConfigError, match="not a ViT"):
        build_openclip(vision("RN50"), device="meta")
    with pytest.raises(ConfigError, match="feature_layer=-5 is outside the tower's 3 layers"):
        build_openclip(vision("tinylmm-test-clip", feature_layer=-5))
    with pytest.raises(
        ConfigError,
        match="not a pretrained tag of open_clip's 'ViT-SO400M-14-SigLIP-384' "
        r"\(did you mean 'webli'\?\); its tags: webli",
    ):
        build_openclip(vision("ViT-SO400M-14-SigLIP-384", pretrained="webly"))
    with pytest.raises(ConfigError, match="trained with QuickGELU.*open_clip:ViT-L-14-336-quickgelu"):
        build_openclip(vision("ViT-L-14-336", pretrained="openai"))
    with pytest.raises(ConfigError, match="no file or directory"):
        build_openclip(vision("tinylmm-test-clip", pretrained=str(tmp_path / "missing.safetensors")))
    # offline, not in the cache: one message with the repo and the fix, fast
    with pytest.raises(
        ModelNotFoundError,
        match="huggingface-cli download timm/ViT-SO400M-14-SigLIP-384 "
        "--local-dir DIR, then model.vision.pretrained=DIR",
    ):
        build_openclip(vision("ViT-SO400M-14-SigLIP-384", pretrained="webli"))
    with pytest.raises(ConfigError, match="pretrained names the weights of an open_clip tower"):
        resolve("toy", "share", ["model.vision.pretrained=webli"])
    with pytest.raises(ConfigError, match="not both"):
        resolve(
            "toy",
            "share",
            ["model.vision.name_or_path=open_clip:tinylmm-test-clip", "model.vision.config={model_type: siglip}"],
        )


def test_without_open_clip_the_cli_says_what_to_install(monkeypatch, capsys):
    import sys

    from tinylmm.cli.app import app
    from tinylmm.cli.errors import run_cli

    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    # feature layer -3: a spec the planner has not built (and cached) yet
    monkeypatch.setattr(
        sys,
        "argv",
        ["tinylmm", "plan", "--preset", "tinyllava-phi2-openclip-siglip-3.1b", "model.vision.feature_layer=-3"],
    )
    assert run_cli(app) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "needs open_clip_torch and torchvision: pip install 'tinylmm[openclip]'" in err and "Traceback" not in err


def _open_clip_checkpoint(name, path: Path, visual_only=False) -> dict:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = open_clip.create_model(name)
    state = (model.visual if visual_only else model).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return model.visual.state_dict()


@pytest.mark.parametrize("visual_only", [False, True])
def test_pretrained_weights_from_a_file(visual_only, tmp_path):
    want = _open_clip_checkpoint("tinylmm-test-clip", tmp_path / "w.safetensors", visual_only)
    tower = build_openclip(vision("tinylmm-test-clip", pretrained=str(tmp_path / "w.safetensors")))
    for k, v in tower.model.state_dict().items():
        torch.testing.assert_close(v, want[k])
    # a bare file gets open_clip's default preprocessing, as open_clip.create_model(name, pretrained=FILE)
    assert tower.config.preprocess == {
        "size": 32,
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }
    _open_clip_checkpoint("tinylmm-test-siglip", tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="does not fit the image tower"):
        build_openclip(vision("tinylmm-test-clip", pretrained=str(tmp_path / "other.safetensors")))


def test_pretrained_directory_brings_its_preprocessing(tmp_path):
    want = _open_clip_checkpoint("tinylmm-test-siglip", tmp_path / "open_clip_model.safetensors")
    config = {
        "model_cfg": open_clip.get_model_config("tinylmm-test-siglip"),
        "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "resize_mode": "squash"},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    model, proc = build_model(spec(pretrained=str(tmp_path), pad_to_square=False))
    torch.testing.assert_close(model.vision.model.trunk.patch_embed.proj.weight, want["trunk.patch_embed.proj.weight"])
    ip = proc.image_processor
    assert (ip.size, ip.image_mean, ip.image_std, ip.resize, ip.interpolation, ip.pad_to_square) == (
        32,
        [0.5] * 3,
        [0.5] * 3,
        "squash",
        "bilinear",
        False,
    )
    config["model_cfg"]["vision_cfg"]["image_size"] = 64
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="describes another image tower"):
        build_openclip(vision("tinylmm-test-siglip", pretrained=str(tmp_path)))
    (tmp_path / "open_clip_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="holds none of open_clip_model.safetensors"):
        build_openclip(vision("tinylmm-test-siglip", pretrained=str(tmp_path)))


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("name, select", [("tinylmm-test-siglip", "patch"), ("tinylmm-test-clip", "cls_patch")])
def test_forward_backward_generate_save_load(name, select, tmp_path, monkeypatch):
    model, proc = build_model(spec(name, select=select))
    assert isinstance(model.vision, OpenCLIPTower)
    assert model.num_image_tokens == 16 + (select == "cls_patch")
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    turns = [("human", "<image>\nWhat color is the circle?"), ("gpt", "red")]
    enc = proc.encode(turns, num_images=1)
    ids = torch.tensor([enc.input_ids])
    out = model(ids, torch.ones_like(ids), proc.image_processor(img)[None], torch.tensor([enc.labels]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.vision.parameters())

    model.eval()
    prompt = proc.prompt([("human", "<image>\nWhat color is the circle?")], [img])
    assert model.generate(**prompt, max_new_tokens=4, min_new_tokens=4).shape == (1, 4)
    model.save(tmp_path / "ck", proc)
    assert (tmp_path / "ck" / "vision" / "open_clip.json").exists()
    # the checkpoint describes its tower itself: no open_clip registry entry needed to load it
    monkeypatch.delitem(open_clip.factory._MODEL_CONFIGS, name)
    again, proc2 = load(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(again(**prompt).logits, model(**prompt).logits, rtol=0, atol=0)
    assert proc2.image_processor == proc.image_processor and again.num_image_tokens == model.num_image_tokens


def test_vision_lora_and_partial_training_reach_the_blocks():
    from tinylmm.config import LoraSpec, StageConfig
    from tinylmm.models import adapters
    from tinylmm.trainability import apply as apply_plan

    model, proc = build_model(spec("tinylmm-test-clip"))
    adapters.attach_vision_lora(model, LoraSpec(r=4, alpha=8))
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.vision.named_parameters() if "lora_" in n}
    # nn.MultiheadAttention reads out_proj's weight directly: an adapter there would never run
    assert lora == {"c_fc", "c_proj"}
    apply_plan(model, StageConfig(tune={"vision": "lora", "connector": "frozen", "llm": "frozen"}))
    model.vision(torch.randn(2, 3, 32, 32)).sum().backward()
    trained = [p for p in model.vision.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)

    model, _ = build_model(spec("tinylmm-test-siglip"))
    adapters.attach_vision_lora(model, LoraSpec(r=4, alpha=8))
    # timm calls the patch embedding (a Conv2d) `proj` too: adapters go on the linear layers only
    wrapped = {n.split(".lora_")[0] for n, _ in model.vision.named_parameters() if "lora_" in n}
    assert len(wrapped) == 4 * 2 and not any("patch_embed" in n for n in wrapped)
    adapters.merge_vision_lora(model)

    model, _ = build_model(spec("tinylmm-test-siglip"))
    apply_plan(model, StageConfig(tune={"vision": "partial:1", "connector": "frozen", "llm": "frozen"}))
    names = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("model.trunk.blocks.1.") for n in names)


# --------------------------------------------------------------------------- preprocessing


def _images():
    rng = torch.Generator().manual_seed(0)
    for w, h in [(64, 48), (30, 50), (32, 32), (20, 20), (37, 91)]:
        pixels = (torch.rand(h, w, 3, generator=rng) * 255).to(torch.uint8).numpy()
        yield Image.fromarray(pixels, "RGB")
    yield Image.fromarray((torch.rand(40, 24, generator=rng) * 255).to(torch.uint8).numpy(), "L")


@pytest.mark.parametrize("resize", ["squash", "shortest", "longest"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_preprocessing_equals_open_clips_transform(resize, interpolation):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    ours = ImageProcessor(
        size=32,
        image_mean=mean,
        image_std=std,
        pad_to_square=False,
        resize=resize,
        interpolation=interpolation,
        fill=[7, 7, 7],
    )
    theirs = image_transform_v2(
        PreprocessCfg(
            size=32, mean=tuple(mean), std=tuple(std), interpolation=interpolation, resize_mode=resize, fill_color=7
        ),
        is_train=False,
    )
    for img in _images():
        torch.testing.assert_close(ours(img), theirs(img), atol=1e-5, rtol=0)


def test_image_processor_files_old_and_new(tmp_path):
    (tmp_path / "image_processor.json").write_text(
        json.dumps({"size": 32, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "pad_to_square": True})
    )
    old = ImageProcessor.load(tmp_path)  # written before resize / interpolation / fill existed
    assert (old.resize, old.interpolation, old.fill) == ("squash", "bicubic", [0, 0, 0])
    (tmp_path / "image_processor.json").write_text(
        json.dumps({"size": 32, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resise": "squash"})
    )
    with pytest.raises(ValueError, match="unknown key 'resise' \\(did you mean 'resize'\\?\\)"):
        ImageProcessor.load(tmp_path)
    with pytest.raises(ValueError, match="resize 'crop' is not one of squash, shortest, shortest_floor, longest"):
        ImageProcessor(size=32, image_mean=[0.5] * 3, image_std=[0.5] * 3, resize="crop")


# --------------------------------------------------------------------------- the planner


def test_visual_tower_parameter_counts_equal_open_clips_profile():
    # open_clip docs/model_profile.csv (mlfoundations/open_clip), column image_mparams:
    # ViT-SO400M-14-SigLIP-384 428.23, ViT-L-14-336 304.29 (the same towers through
    # transformers: tests/test_memory.py)
    assert visual_parameter_count("ViT-SO400M-14-SigLIP-384") == 428_225_600
    assert round(visual_parameter_count("ViT-L-14-336") / 1e6, 2) == 304.29
    assert visual_parameter_count("ViT-L-14-336-quickgelu") == visual_parameter_count("ViT-L-14-336")


def test_planner_counts_the_cut_open_clip_tower():
    cfg, _ = resolve("tinyllava-phi2-openclip-siglip-3.1b", "base")
    meta = mem.build_meta(cfg.model)
    layer = 4 * (1152 * 1152 + 1152) + 2 * 1152 * 4304 + 4304 + 1152 + 4 * 1152
    head = 15_238_352  # the attention-pooling head, as transformers' SiglipVisionModel's
    assert sum(p.numel() for p in meta.vision.parameters()) == 428_225_600 - layer - 2 * 1152 - head
    assert meta.num_image_tokens == meta.tower_tokens == 729
    clip = mem.build_meta(resolve("tinyllava-tinyllama-openclip-clip-1.3b", "base")[0].model)
    assert clip.num_image_tokens == 576 and clip.tower_tokens == 577 and len(clip.vision.layers) == 23


def test_the_same_tower_plans_the_same_through_open_clip_and_transformers():
    # SigLIP-so400m: transformers' SiglipVisionModel and open_clip's timm ViT run the same
    # ops; their plans agree (timm's exact GELU and tanh GELU save the same)
    hf = mem.plan_run(resolve("tinyllava-phi2-siglip-3.1b", "share", tune="qlora")[0], seq_len=2048)
    oc = mem.plan_run(resolve("tinyllava-phi2-openclip-siglip-3.1b", "share", tune="qlora")[0], seq_len=2048)
    for a, b in zip(hf.stages, oc.stages):
        assert a.breakdown.keys() == b.breakdown.keys()
        for key in a.breakdown:
            assert b.breakdown[key] == pytest.approx(a.breakdown[key], rel=1e-3), (a.name, key)


@pytest.mark.parametrize("preset", ["tinyllava-phi2-openclip-siglip-3.1b", "tinyllava-tinyllama-openclip-clip-1.3b"])
def test_open_clip_presets_plan_offline_and_fit_24gb(preset, monkeypatch, capsys):
    import sys

    from tinylmm.cli.app import app
    from tinylmm.cli.errors import run_cli

    for recipe in ("base", "share"):
        for tune in ("qlora", "lora"):
            plan = mem.plan_run(resolve(preset, recipe, tune=tune)[0], seq_len=2048)
            assert plan.fits, [(s.name, mem.fmt_bytes(s.total)) for s in plan.stages]
    monkeypatch.setattr(sys, "argv", ["tinylmm", "plan", "--preset", preset, "--tune", "qlora"])
    assert run_cli(app) == 0 and "every stage fits" in capsys.readouterr().out


def test_zoo_shows_the_preprocessing_of_the_presets_weights_without_reading_them():
    # webli's SigLIP weights want mean/std 0.5 and a squash resize; open_clip's defaults
    # (CLIP's mean, shortest-edge crop) would be reported if the tag were ignored offline
    from tinylmm.api import zoo

    zoo._stats.cache_clear()
    siglip = zoo.describe("tinyllava-phi2-openclip-siglip-3.1b", plan=False)["image"]
    assert siglip["mean"] == siglip["std"] == [0.5, 0.5, 0.5] and siglip["resize"] == "squash"
    clip = zoo.describe("tinyllava-tinyllama-openclip-clip-1.3b", plan=False)["image"]
    assert clip["mean"][0] == pytest.approx(0.48145466) and clip["size"] == 336


@pytest.mark.parametrize("name, block", [("ViT-M-16-alt", "ResidualAttentionBlock"), ("EVA02-B-16", "EvaBlock")])
def test_the_planner_refuses_blocks_it_does_not_know(name, block):
    # layer scale (ViT-M-16-alt), EVA's rotary blocks: not modelled, so not guessed
    cfg, _ = resolve(
        "tinyllava-tinyllama-openclip-clip-1.3b",
        "share",
        [f"model.vision.name_or_path=open_clip:{name}", "model.vision.pretrained=null"],
    )
    with pytest.raises(ConfigError, match=f"does not know the layer layout of {block}"):
        mem.plan_run(cfg)


@pytest.mark.parametrize(
    "tower", ["open_clip:tinylmm-test-siglip-mid", "open_clip:tinylmm-test-clip-mid", "transformers"]
)
@pytest.mark.parametrize(
    "tune, precision", [("full", "fp32"), ("partial:2", "fp32"), ("full", "bf16"), ("lora", "fp32")]
)
def test_activation_estimate_matches_bytes_saved_for_backward(tower, tune, precision, tmp_path):
    # the tower's share of a whole step is a few percent: it is held to the truth on its own
    vision = (
        [SIGLIP_MID] if tower == "transformers" else ["model.vision.config=null", f"model.vision.name_or_path={tower}"]
    ) + ["model.vision.feature_layer=-2"]  # the recipe's cut (the toy's -3 suits its own tower)
    cfg, _ = resolve(
        "toy", "share", [MID, *vision, f"stages.share.tune.vision={tune}", "lora.r=8", f"train.precision={precision}"]
    )
    model = measure.stage_model(cfg, "share", tmp_path, precision)
    batch = measure.make_batch(model, 2, 320)
    acts = mem.stage_activations(
        mem.build_meta(cfg.model),
        cfg,
        "share",
        seq_len=320,
        precision=precision,
        device="cpu",
        logit_positions=measure.logit_positions(batch),
    )
    v, tokens = acts.vision, acts.vision_tokens * 2
    plain, ckpt = measure.measure_tower_saved(model, batch["pixel_values"], precision)
    assert plain > 0
    assert (v.outside + v.layers) * tokens + v.fixed_outside + v.fixed_layers == pytest.approx(plain, rel=0.01)
    assert (v.outside + v.held) * tokens + v.recompute(tokens) + v.fixed_outside == pytest.approx(ckpt, rel=0.01)
    if tune == "full" and tower != "transformers":  # and the whole step, as tests/test_memory.py
        model = measure.stage_model(cfg, "share", tmp_path / "again", precision)
        plain, ckpt = measure.measure_saved(model, batch, precision)
        assert sum(acts.saved(2, False).values()) == pytest.approx(plain, rel=0.01)
        assert sum(acts.saved(2, True).values()) == pytest.approx(ckpt, rel=0.01)


# --------------------------------------------------------------------------- training


def test_short_training_run_with_an_open_clip_tower(tmp_path):
    from tinylmm.api import train_run

    from conftest import TINY, tiny_stages

    tower = [
        "model.vision.config=null",
        "model.vision.name_or_path=open_clip:tinylmm-test-clip",
        "train.gradient_checkpointing=true",
        "model.vision.feature_layer=-2",
        "stages.share.tune.vision=partial:1",  # its 3 layers, cut at -2
    ]
    llm = [o for o in TINY if not o.startswith("model.vision.")]
    result = train_run(overrides=llm + tower + tiny_stages(steps=2), output_dir=str(tmp_path / "run"), evaluate=False)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in result.losses.values())
    final = tmp_path / "run" / "final"
    assert (final / "vision" / "open_clip.json").exists()
    model, proc = load(final)
    assert isinstance(model.vision, OpenCLIPTower) and proc.image_processor.size == 32
