"""The model zoo: every preset parses, builds on the meta device from embedded configs and
plans offline; the published parameter counts; listing, showing, registering a user's file."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinylmm
from tinylmm import memory as mem
from tinylmm.api import zoo as zoo_api
from tinylmm.catalog import zoo
from tinylmm.cli.app import app
from tinylmm.config import ConfigError, resolve
from tinylmm.models.arch import TOKENIZER_LEN
from tinylmm.models.loading import resolve_location
from tinylmm.train import measure

from conftest import is_openclip, openclip_testable

TINYLLAVA = ("tinyllava-phi2-siglip-3.1b", "tinyllava-stablelm2-siglip-2.0b", "tinyllava-tinyllama-siglip-1.5b")


def arch(hub_id: str) -> dict:
    return json.loads(mem.arch_file(hub_id).read_text())


@pytest.fixture(scope="module")
def described():
    """zoo.describe of every preset, memory plan included: built once (meta builds are cached)."""
    return {
        name: zoo_api.describe(name)
        for name in zoo.names()
        if openclip_testable() or not is_openclip(zoo.get(name).model_spec().vision)
    }


@pytest.fixture
def user_zoo(tmp_path):
    path = tmp_path / "my_zoo.yaml"
    path.write_text(
        "mine-tiny:\n"
        "  description: the toy with a linear connector\n"
        "  family: toy\n"
        "  vision_family: toy\n"
        "  model:\n"
        "    template: llama\n"
        "    llm:\n"
        "      tokenizer: builtin:toy\n"
        "      config: {model_type: llama, vocab_size: 512, hidden_size: 64, intermediate_size: 128,\n"
        "               num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 2,\n"
        "               max_position_embeddings: 512, tie_word_embeddings: true,\n"
        "               bos_token_id: 1, eos_token_id: 2, pad_token_id: 3}\n"
        "    vision:\n"
        "      config: {model_type: siglip_vision_model, hidden_size: 32, intermediate_size: 64,\n"
        "               num_hidden_layers: 3, num_attention_heads: 2, image_size: 32, patch_size: 8}\n"
        "    connector: {type: linear}\n"
        "  stage_defaults:\n"
        "    pretrain: {data: {shapes: caption}, batch_size: 8, micro_batch_size: 8, max_len: 128}\n"
        "    share: {data: {shapes: caption}, tune: {vision: full}, batch_size: 8, micro_batch_size: 8, max_len: 128}\n"
        "    finetune: {data: {shapes: instruct}, batch_size: 8, micro_batch_size: 8, max_len: 128}\n"
        "  run: {train: {precision: fp32}}\n"
        "mine-qwen:\n"
        "  description: Qwen3-0.6B with CLIP\n"
        "  family: qwen3\n"
        "  vision_family: clip\n"
        "  recommended: {recipe: base, tune: lora}\n"
        "  model:\n"
        "    template: auto\n"
        "    llm: {name_or_path: Qwen/Qwen3-0.6B}\n"
        "    vision: {name_or_path: openai/clip-vit-large-patch14-336}\n"
    )
    yield path
    zoo.unregister()


# --------------------------------------------------------------------------- the shipped presets


def test_the_zoo_spans_families_and_keeps_the_tinyllava_names():
    presets = zoo.presets()
    assert len(presets) >= 20
    assert {"toy", *TINYLLAVA} <= set(presets)
    families = {p.info.family for p in presets.values()} - {"toy"}
    towers = {p.info.vision_family for p in presets.values()} - {"toy"}
    assert len(families) >= 6 and len(towers) >= 3, (families, towers)
    assert all(p.description and p.shipped for p in presets.values())


def test_every_preset_is_complete_and_embedded():
    for name, p in zoo.presets().items():
        spec = p.model_spec()
        assert p.info.licence and p.info.commercial is not None and p.info.recommended, name
        for part in (spec.llm, spec.vision):
            if part.config is None and part.name_or_path.startswith("builtin:"):  # shipped in the package
                assert (Path(resolve_location(part.name_or_path)) / "config.json").exists(), name
            elif part.config is None and not part.name_or_path.startswith("open_clip:"):
                # a hub id: planning it offline needs its config (open_clip ships its own)
                assert mem.arch_file(part.name_or_path).exists(), (name, part.name_or_path)
        if spec.llm.config is None and not spec.llm.name_or_path.startswith("builtin:"):
            assert (spec.llm.tokenizer or spec.llm.name_or_path) in TOKENIZER_LEN, name
        assert spec.template in ("auto", "phi", "llama"), name
        if p.info.gated:  # the gated families, and only they
            assert p.info.family in ("llama3.2", "gemma2"), name
    assert zoo.get("qwen2.5-3b-siglip-3.4b").info.commercial is False  # Qwen Research License
    assert zoo.get("tinyllava-stablelm2-siglip-2.0b").info.commercial is False  # needs a Stability membership


def test_names_carry_the_computed_size(described):
    for name, d in described.items():
        if name != "toy":
            assert name.endswith("-" + zoo.size_label(d["params"]["total"])), (name, d["params"]["total"])
    assert zoo.size_label(3_186_937_120) == "3.1b"  # TinyLLaVA-Phi-2-SigLIP-3.1B truncates, not rounds


def test_every_preset_shows_offline_and_its_recommendation_fits_24gb(described):
    for name, d in described.items():
        p = d["params"]
        assert p["total"] == p["llm"] + p["vision"] + p["connector"]
        assert 0 < p["vision"] <= p["vision_full"], name
        patches = (d["image"]["size"] // d["image"]["patch_size"]) ** 2
        reduced = {"tinyllava-tinyllama-siglip-cabs-1.5b": 144, "tinyllava-phi2-clip-ldpv2-3.0b": 144}
        assert d["visual_tokens"] == reduced.get(name, patches), name
        plan = d["plan"]
        assert plan["recipe"] == d["recommended"]["recipe"] and plan["tune"] == d["recommended"]["tune"]
        assert plan["fits"], (name, [(s["name"], s["peak"] / 2**30) for s in plan["stages"]])
    share = described["tinyllava-phi2-siglip-3.1b"]
    assert share["scores"] == {
        "VQAv2": 80.1,
        "GQA": 62.1,
        "SQA-IMG": 73.0,
        "TextVQA": 60.3,
        "MM-Vet": 37.5,
        "POPE": 87.2,
        "MME": 1466.4,
        "MMMU": 38.4,
    }
    assert "TinyLLaVA_Factory" in share["scores_source"] and "share recipe" in share["scores_source"]
    fast = described["qwen2.5-0.5b-siglip-b-0.5b"]
    assert fast["visual_tokens"] == 196 and fast["image"]["size"] == 224
    clip = described["tinyllava-phi2-clip-3.0b"]
    assert clip["visual_tokens"] == 576 and clip["image"]["mean"][0] == pytest.approx(0.48145466)


# --------------------------------------------------------------------------- published parameter counts

# hub id -> (published total, its unit, source). Counted on the meta device from the embedded
# config; equal within the rounding of the published figure.
PUBLISHED = {
    "Qwen/Qwen2.5-0.5B-Instruct": (0.49e9, 0.01e9, "model card: 0.49B (0.36B non-embedding)"),
    "Qwen/Qwen2.5-1.5B-Instruct": (1.54e9, 0.01e9, "model card: 1.54B (1.31B non-embedding)"),
    "Qwen/Qwen2.5-3B-Instruct": (3.09e9, 0.01e9, "model card: 3.09B (2.77B non-embedding)"),
    "Qwen/Qwen3-0.6B": (0.6e9, 0.1e9, "model card: 0.6B (0.44B non-embedding)"),
    "Qwen/Qwen3-1.7B": (1.7e9, 0.1e9, "model card: 1.7B (1.4B non-embedding)"),
    "Qwen/Qwen3-4B": (4.0e9, 0.1e9, "model card: 4.0B (3.6B non-embedding)"),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": (1.7e9, 0.1e9, "model card and paper: 1.7B"),
    "meta-llama/Llama-3.2-1B-Instruct": (1.23e9, 0.01e9, "model card: 1B (1.23B)"),
    "meta-llama/Llama-3.2-3B-Instruct": (3.21e9, 0.01e9, "model card: 3B (3.21B)"),
    "google/gemma-2-2b-it": (2_614_341_888, 1, "Gemma 2 report, table 2: 2,024,517,888 non-embedding + 256,000 x 2304"),
}
NON_EMBEDDING = {  # published non-embedding counts (tied embeddings: total - vocab x hidden)
    "Qwen/Qwen2.5-0.5B-Instruct": (0.36e9, 0.01e9),
    "Qwen/Qwen2.5-1.5B-Instruct": (1.31e9, 0.01e9),
    "Qwen/Qwen2.5-3B-Instruct": (2.77e9, 0.01e9),
    "Qwen/Qwen3-0.6B": (0.44e9, 0.01e9),
    "Qwen/Qwen3-1.7B": (1.4e9, 0.1e9),
    "Qwen/Qwen3-4B": (3.6e9, 0.1e9),
    "google/gemma-2-2b-it": (2_024_517_888, 1),
}


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_llm_parameter_counts_match_the_published_ones(hub_id):
    published, unit, _ = PUBLISHED[hub_id]
    data = arch(hub_id)
    n = mem.count_llm_parameters(data)
    # Meta's card truncates (1.2358B reads 1.23B); the others round
    fits = (
        (lambda x: math.floor(x / unit) * unit)
        if hub_id.startswith("meta-llama")
        else (lambda x: round(x / unit) * unit)
    )
    assert fits(n) == pytest.approx(published), (n, published)
    if hub_id in NON_EMBEDDING:
        assert data["tie_word_embeddings"]
        ne, ne_unit = NON_EMBEDDING[hub_id]
        assert round((n - data["vocab_size"] * data["hidden_size"]) / ne_unit) * ne_unit == pytest.approx(ne)


def test_vision_parameter_counts_match_the_published_ones():
    # open_clip docs/model_profile.csv, image_mparams: ViT-B-16-SigLIP 92.88 (with its pooling head,
    # as SiglipVisionModel). SigLIP 2's fixed-resolution So400m/14 at 384 px is a `siglip` checkpoint
    # of the same shape as SigLIP's (ViT-SO400M-14-SigLIP-384: 428.23).
    base = mem.count_vision_parameters(arch("google/siglip-base-patch16-224"))
    assert base == 92_884_224 and round(base / 1e6, 2) == 92.88
    siglip2 = arch("google/siglip2-so400m-patch14-384")
    assert siglip2 == arch("google/siglip-so400m-patch14-384")
    assert round(mem.count_vision_parameters(siglip2) / 1e6, 2) == 428.23
    # facebookresearch/dinov2 README, "Pretrained models": ViT-L/14 distilled, 300 M (rounded to
    # 10 M; the mask token of its masked pre-training included, which tinylmm drops)
    dinov2 = mem.count_vision_parameters(arch("facebook/dinov2-large"))
    assert dinov2 == 304_368_640 and round(dinov2 / 1e7) * 1e7 == 300e6


def test_dinov2_preset_feeds_224_px_and_drops_the_cls_token(described):
    d = described["qwen2.5-1.5b-dinov2-l-1.8b"]
    assert d["vision_family"] == "dinov2" and d["model_types"]["vision"] == "dinov2"
    assert d["image"]["size"] == 224 and d["visual_tokens"] == 256  # 16 x 16 patches, CLS dropped
    assert d["image"]["mean"] == [0.485, 0.456, 0.406] and d["image"]["pad_to_square"]
    # cut at layer -2: the last of 24 layers, the final layernorm and the mask token are gone
    layer = 4 * (1024 * 1024 + 1024) + 2 * 1024 * 4096 + 4096 + 1024 + 2 * 2 * 1024 + 2 * 1024
    assert d["params"]["vision"] == d["params"]["vision_full"] - layer - 2 * 1024 - 1024


# --------------------------------------------------------------------------- the planner on the new families


QK = (
    "vocab_size: 4096, hidden_size: 256, intermediate_size: 688, num_hidden_layers: 3, num_attention_heads: 8, "
    "num_key_value_heads: 2, head_dim: 64, max_position_embeddings: 1024, tie_word_embeddings: true, "
    "bos_token_id: 1, eos_token_id: 2, pad_token_id: 3"
)
SMALL_LLMS = {
    "qwen3": f"{{model_type: qwen3, {QK}}}",
    "gemma2": f"{{model_type: gemma2, {QK}, query_pre_attn_scalar: 64, sliding_window: 64, "
    f"final_logit_softcapping: 30.0, attn_logit_softcapping: 50.0}}",
}
SMALL_TOWER = (
    "model.vision.config={model_type: siglip_vision_model, hidden_size: 192, intermediate_size: 768, "
    "num_hidden_layers: 3, num_attention_heads: 3, image_size: 112, patch_size: 16}"
)


@pytest.mark.parametrize(
    "family, stage, precision",
    [
        ("qwen3", "finetune", "fp32"),  # per-head q/k norms, GQA, tied head
        ("gemma2", "finetune", "fp32"),  # four norms, soft-capped eager attention, final logit cap
        ("gemma2", "pretrain", "bf16"),  # frozen LLM that gradients flow through, autocast
    ],
)
def test_planner_matches_torch_on_qwen3_and_gemma2(family, stage, precision, tmp_path):
    from tinylmm.models.assemble import build_model
    from tinylmm.train.stages import prepare_stage

    cfg, _ = resolve(
        "toy", "share", [f"model.llm.config={SMALL_LLMS[family]}", SMALL_TOWER, f"train.precision={precision}"]
    )
    meta = mem.build_meta(cfg.model)
    assert meta.llm_attention == ("eager" if family == "gemma2" else "sdpa")  # gemma2 has no sdpa path
    model, _ = build_model(cfg.model, attn_implementation=meta.llm_attention)
    prepare_stage(model, cfg, stage, tmp_path, device="cpu", half_dtype=torch.bfloat16 if precision == "bf16" else None)
    batch = measure.make_batch(model.train(), 2, 160)
    plain, ckpt = measure.measure_saved(model, batch, precision)
    acts = mem.stage_activations(
        meta, cfg, stage, seq_len=160, precision=precision, device="cpu", logit_positions=measure.logit_positions(batch)
    )
    assert sum(acts.saved(2, False).values()) == pytest.approx(plain, rel=0.01)
    assert sum(acts.saved(2, True).values()) == pytest.approx(ckpt, rel=0.01)


# --------------------------------------------------------------------------- listing and filters


def test_a_preset_whose_tower_needs_open_clip_is_listed_without_counts_where_it_is_missing(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    zoo_api._stats.cache_clear()
    try:
        rows = {r["name"]: r for r in zoo_api.select()}
        row = rows["tinyllava-phi2-openclip-siglip-3.1b"]
        assert row["params"] is None and "needs open_clip_torch" in row["unavailable"]
        assert (
            rows["tinyllava-phi2-siglip-3.1b"]["params"] and rows["tinyllava-phi2-siglip-3.1b"]["unavailable"] is None
        )
        assert "tinyllava-phi2-openclip-siglip-3.1b" not in {r["name"] for r in zoo_api.select(max_params=10**12)}
        out = CliRunner().invoke(app, ["zoo", "ls"], env={"COLUMNS": "200"})
        assert out.exit_code == 0 and "needs open_clip_torch" in out.output
    finally:
        zoo_api._stats.cache_clear()


def test_filters_select_the_rows():
    everything = zoo_api.select()
    assert len(everything) == len(zoo.names())
    assert {r["family"] for r in zoo_api.select(family="qwen3")} == {"qwen3"}
    assert {r["vision_family"] for r in zoo_api.select(vision="siglip2")} == {"siglip2"}
    small = zoo_api.select(max_params=zoo.parse_count("2B"))
    assert small and all(r["params"] <= 2e9 for r in small) and len(small) < len(everything)
    assert all(r["commercial"] and not r["gated"] for r in zoo_api.select(commercial=True, gated=False))
    assert {r["template"] for r in zoo_api.select(template="auto")} == {"auto"}
    assert zoo.parse_count("800M") == 800_000_000 and zoo.parse_count("1.5b") == 1_500_000_000
    with pytest.raises(ConfigError, match="did you mean 'qwen3'"):
        zoo_api.select(family="qwen")
    with pytest.raises(ConfigError, match="not a parameter count"):
        zoo.parse_count("lots")


def test_cli_ls_and_show_json_and_tables():
    runner = CliRunner()
    out = runner.invoke(app, ["zoo", "ls", "--json", "--family", "gemma2"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [r["name"] for r in rows] == ["gemma2-2b-siglip-3.0b"] and rows[0]["gated"]
    out = runner.invoke(app, ["zoo", "ls", "--vision", "clip", "--max-params", "2.05B", "--ungated"])
    assert out.exit_code == 0 and "tinyllava-tinyllama-clip-1.3b" in out.output
    assert "tinyllava-phi2-clip-3.0b" not in out.output
    out = runner.invoke(app, ["zoo", "show", "qwen3-0.6b-siglip-b-0.6b", "--json"])
    assert out.exit_code == 0, out.output
    d = json.loads(out.output)
    assert d["family"] == "qwen3" and d["visual_tokens"] == 196 and d["plan"]["fits"]
    assert d["stage_defaults"]["share"]["tune"]["vision"] == "partial:6"  # the share recipe on an 11-layer tower
    out = runner.invoke(app, ["zoo", "show", "tinyllava-phi2-siglip-3.1b"], env={"COLUMNS": "160"})
    assert out.exit_code == 0, out.output
    for text in ("3,186,937,120", "397,745,440", "729 per image", "1466.4", "TinyLLaVA_Factory", "17.65 GiB"):
        assert text in out.output, text
    out = runner.invoke(app, ["ls", "presets"])  # the old listing still works
    assert out.exit_code == 0 and "qwen3-4b-siglip2-4.4b" in out.output


# --------------------------------------------------------------------------- a user's presets


def test_register_adds_presets_that_train_and_plan_like_shipped_ones(user_zoo):
    assert zoo.register(user_zoo) == ["mine-tiny", "mine-qwen"]
    assert zoo.get("mine-qwen").source == str(user_zoo.resolve())
    assert "mine-tiny" in zoo.names() and "toy" in zoo.names()
    cfg, sources = resolve("mine-tiny", "share")
    assert cfg.model.connector.type == "linear" and sources["model.connector.type"] == "preset:mine-tiny"
    assert zoo_api.stats("mine-qwen").num_image_tokens == 576
    with pytest.raises(ConfigError, match="did you mean 'mine-tiny'"):
        zoo.get("mine-tin")
    assert zoo.register(user_zoo) == ["mine-tiny", "mine-qwen"]  # again: replaces its own
    zoo.unregister(user_zoo)
    assert "mine-tiny" not in zoo.names()


def test_zoo_option_on_the_commands(user_zoo):
    runner = CliRunner()
    out = runner.invoke(
        app, ["plan", "--zoo", str(user_zoo), "-p", "mine-qwen", "-r", "base", "--tune", "lora", "--json"]
    )
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    assert plan["preset"] == "mine-qwen" and [s["name"] for s in plan["stages"]] == ["pretrain", "finetune"]
    out = runner.invoke(app, ["zoo", "ls", "--zoo", str(user_zoo), "--json", "--vision", "clip"])
    assert {"mine-qwen"} <= {r["name"] for r in json.loads(out.output)}
    out = runner.invoke(app, ["zoo", "show", "mine-tiny", "--zoo", str(user_zoo), "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["plan"] is None  # no recommendation given
    out = runner.invoke(
        app,
        [
            "train",
            "--zoo",
            str(user_zoo),
            "-p",
            "mine-tiny",
            "--no-eval",
            "-o",
            str(user_zoo.parent / "run"),
            "stages.pretrain.max_steps=1",
            "stages.share.max_steps=1",
            "stages.finetune.max_steps=1",
            "shapes.n_caption=16",
            "shapes.n_instruct=16",
            "shapes.n_eval=8",
        ],
    )
    assert out.exit_code == 0, out.output
    assert (user_zoo.parent / "run" / "finetune" / "final").is_dir()


@pytest.mark.parametrize(
    "text, message",
    [
        ("mine:\n  famly: qwen3\n  model: {template: phi}\n", r"my_zoo.yaml:mine.famly' \(did you mean 'family'\?\)"),
        (
            "mine:\n  family: qwen\n  model: {template: phi}\n",
            r"my_zoo.yaml:mine.family: 'qwen' .*did you mean 'qwen3'",
        ),
        ("mine:\n  model: {llm: {name_or_pth: x}}\n", r"my_zoo.yaml:mine.model.llm.name_or_pth' \(did you mean"),
        ("mine:\n  scores: {GQA: 60}\n  model: {template: phi}\n", "my_zoo.yaml:mine: scores need a 'scores_source'"),
        ("mine:\n  recommended: {recipe: shar}\n  model: {template: phi}\n", "did you mean 'share'"),
        ("toy:\n  model: {template: phi}\n", "preset 'toy' is a shipped preset"),
        ("- a list\n", "expected a mapping of preset name"),
    ],
)
def test_a_bad_user_file_names_the_file_and_registers_nothing(text, message, tmp_path):
    path = tmp_path / "my_zoo.yaml"
    path.write_text(text + "fine:\n  model: {template: phi}\n" if not text.startswith("-") else text)
    with pytest.raises(ConfigError, match=message):
        zoo.register(path)
    assert "fine" not in zoo.names()
    with pytest.raises(ConfigError, match="does not exist"):
        zoo.register(tmp_path / "nowhere.yaml")


def test_two_files_cannot_claim_one_name(user_zoo, tmp_path):
    zoo.register(user_zoo)
    other = tmp_path / "other.yaml"
    other.write_text("mine-qwen:\n  model: {template: phi}\n")
    with pytest.raises(ConfigError, match="'mine-qwen' is already registered from .*my_zoo.yaml"):
        zoo.register(other)


# --------------------------------------------------------------------------- the Python API


def test_build_gives_model_and_processor_with_overrides():
    model, processor = tinylmm.build("toy", ["connector.type=linear", "model.vision.feature_layer=-1"])
    assert type(model.connector).__name__.lower().startswith("linear")
    assert len(model.vision.layers) == 4  # feature layer -1 keeps every layer of the toy's tower
    assert processor.num_image_tokens == model.num_image_tokens == 16
    with pytest.raises(ConfigError, match="did you mean 'toy'"):
        tinylmm.build("tyo")


def test_template_auto_is_accepted():
    cfg, _ = resolve("qwen3-1.7b-siglip2-2.1b", "base")
    assert cfg.model.template == "auto"
    with pytest.raises(ConfigError, match="unknown template 'autoo'.*did you mean 'auto'"):
        resolve("toy", "share", ["model.template=autoo"])


# --------------------------------------------------------------------------- recorded counts


def test_zoo_ls_reads_counts_that_equal_the_meta_build():
    """`tinylmm zoo ls` lists the shipped presets from tinylmm/assets/zoo_counts.json: each
    record must say what building the preset on the meta device says now."""
    import dataclasses

    from tinylmm.resources import asset

    recorded = json.loads(asset(zoo.COUNTS).read_text())
    assert set(recorded) == {n for n, p in zoo.presets().items() if p.shipped}
    built = zoo_api.recorded_counts() if openclip_testable() else None
    if built is not None:
        assert recorded == built, "stale: run `HF_HUB_OFFLINE=1 python scripts/update_zoo_counts.py`"
    # a preset whose model differs from its record is built instead of read
    toy = zoo.get("toy")
    assert zoo.shipped_counts(toy) == recorded["toy"]
    changed = dataclasses.replace(toy, model={**toy.model, "connector": {"type": "linear"}})
    assert zoo.shipped_counts(changed) is None
