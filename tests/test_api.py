"""The library API behind the CLI (tinylmm.api), called directly: every command is an api
function, and each is exercised here without typer, on tiny models."""

import json

import pytest
import torch
from PIL import Image

from tinylmm import api
from tinylmm.catalog import recipes, zoo
from tinylmm.data.templates import IMAGE_TOKEN
from tinylmm.errors import ConfigError
from tinylmm.memory.plan import RunPlan
from tinylmm.models import adapters
from tinylmm.models.checkpoint import is_checkpoint, read_meta
from tinylmm.models.connectors import CONNECTORS

from conftest import TINY, tiny_stages
from test_tinyllava import write_tinyllava
from test_zoo import user_zoo  # noqa: F401 - the fixture: a user's zoo file of two presets

LORA = ["lora.r=4", "lora.alpha=8"]
STAGES = ["pretrain", "share", "finetune"]
QUESTION = f"{IMAGE_TOKEN}\nWhat color is the circle?"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny LoRA run of the toy preset (share recipe, 2 steps a stage), trained through the api."""
    out = tmp_path_factory.mktemp("api") / "run"
    result = api.train_run(
        "toy", "share", TINY + tiny_stages(steps=2) + LORA, output_dir=out, evaluate=False, tune="lora"
    )
    return out, result


def eval_image(run_dir):
    return next((run_dir / "data" / "shapes" / "images").glob("eval-*.png"))


def logits(model, processor, image):
    model.eval()  # no LoRA dropout
    with torch.no_grad():
        return model(**processor.prompt([("human", QUESTION)], [image])).logits


# --------------------------------------------------------------------------- train, load, chat


def test_train_run_writes_a_lora_run(run):
    out, result = run
    assert result.run_dir == out and result.final == out / "final" and result.is_main
    assert result.eval is None  # evaluate=False
    assert list(result.losses) == STAGES
    assert all(len(v) == 2 and all(torch.isfinite(torch.tensor(v))) for v in result.losses.values())
    assert (out / "config.yaml").exists() and (out / "metrics.jsonl").read_text().count("\n") == 6
    # the LLM trains with adapters where the recipe trains it; the pretrain stage leaves it frozen
    assert (out / "final" / "llm" / "adapter_config.json").exists()
    assert read_meta(out / "final")["llm_base"] and not read_meta(out / "pretrain" / "final")["llm_base"]
    # --resume takes nothing else
    with pytest.raises(ConfigError, match="--resume continues a run with its saved config"):
        api.train_run(resume=out, overrides=["stages.finetune.lr=1e-4"])
    with pytest.raises(ConfigError, match="--resume"):
        api.train_run(resume=out, tune="lora")


def test_load_gives_the_trained_model_and_its_processor(run):
    out, _ = run
    model, processor = api.load(out / "final")
    assert adapters.is_peft(model.llm)
    assert model.llm.config.hidden_size == 64 and len(model.vision.layers) == 3  # TINY: 4 layers, cut at -2
    assert processor.num_image_tokens == model.num_image_tokens == 16  # (32 / 8) ** 2 patches
    with Image.open(eval_image(out)) as im:
        x = logits(model, processor, im.convert("RGB"))
    assert x.shape[0] == 1 and x.shape[-1] == 512 and torch.isfinite(x).all()
    plain, _ = api.load(out / "pretrain" / "final")
    assert not adapters.is_peft(plain.llm)


def test_chat_session_keeps_the_history_and_sends_the_image_once(run, tmp_path):
    out, _ = run
    session = api.ChatSession(out / "final", max_new_tokens=4)
    assert session.turns == [] and session.images == [] and session.pending_image is None
    img = eval_image(out)
    session.set_image(img)
    assert session.image_path == img and session.pending_image is not None
    pieces = []
    first = session.ask("What color is the circle?", on_text=pieces.append)
    assert isinstance(first, str) and pieces and "".join(pieces).strip() == first  # streamed as generated
    assert [who for who, _ in session.turns] == ["human", "gpt"]
    assert session.turns[0][1] == f"{IMAGE_TOKEN}\nWhat color is the circle?" and session.turns[1][1] == first
    assert session.pending_image is None and len(session.images) == 1
    second = session.ask("How many shapes are there?")
    assert isinstance(second, str)
    assert len(session.turns) == 4 and session.turns[2] == ("human", "How many shapes are there?")
    assert len(session.images) == 1  # the image went with the first question only
    session.reset()
    assert session.turns == [] and session.images == [] and session.image_path is None
    # greedy (temperature 0): the same conversation again gives the same answer
    session.set_image(img)
    assert session.ask("What color is the circle?") == first
    # a new image starts a new conversation; a missing one is an error that keeps the session
    session.set_image(img)
    assert session.turns == [] and session.pending_image is not None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        session.set_image(tmp_path / "nowhere.png")
    assert session.image_path == img and session.pending_image is not None


# --------------------------------------------------------------------------- eval, merge, saved configs


def test_evaluate_checkpoint_returns_the_summary_and_writes_the_json(run, tmp_path):
    out, _ = run
    summary, path = api.evaluate_checkpoint(
        out / "final", out=tmp_path / "scores" / "r.json", batch_size=12, max_new_tokens=4
    )
    assert path == tmp_path / "scores" / "r.json"
    assert set(summary) == {"bench", "n", "accuracy", "chance", "by_type", "pope"}
    # the run's own eval split: shapes.n_eval=12 questions, and one POPE image (6 questions per split)
    assert summary["bench"] == "shapes" and summary["n"] == 12 + 3 * 6
    assert set(summary["by_type"]) == {"color", "shape", "count", "position", "relation", "exist"}
    assert summary["by_type"]["exist"]["n"] == 18
    assert 0 <= summary["accuracy"] <= 1 and 0 < summary["chance"] < 1
    assert list(summary["pope"]) == ["random", "popular", "adversarial"]
    for split in summary["pope"].values():
        assert set(split) == {"n", "accuracy", "precision", "recall", "f1", "yes_ratio"} and split["n"] == 6
    saved = json.loads(path.read_text())
    assert {k: saved[k] for k in summary} == summary and len(saved["predictions"]) == 30
    assert sum("pope_split" in p for p in saved["predictions"]) == 18
    # without `out`: the run's eval/ folder (run/final is run/finetune/final)
    again, default = api.evaluate_checkpoint(out / "final", batch_size=12, max_new_tokens=4)
    assert default.resolve() == out.resolve() / "eval" / "shapes.json" and default.exists()
    assert again == summary
    # a stage's checkpoint: beside it, never over the run's own results
    _, stage_default = api.evaluate_checkpoint(out / "pretrain" / "final", batch_size=12, max_new_tokens=4)
    assert stage_default.resolve() == out.resolve() / "pretrain" / "eval" / "shapes.json"
    with pytest.raises(ConfigError, match="unknown benchmark 'shape'.*did you mean 'shapes'"):
        api.evaluate_checkpoint(out / "final", "shape")


def test_merge_checkpoint_folds_the_adapters_in_and_never_overwrites(run, tmp_path):
    out, _ = run
    merged_dir = api.merge_checkpoint(out / "final", tmp_path / "merged")
    assert merged_dir == tmp_path / "merged" and is_checkpoint(merged_dir)
    meta = read_meta(merged_dir)
    assert not meta["llm_base"] and not meta["vision_lora"]
    assert not (merged_dir / "llm" / "adapter_config.json").exists()
    merged, processor = api.load(merged_dir)
    trained, _ = api.load(out / "final")
    assert not adapters.is_peft(merged.llm) and adapters.is_peft(trained.llm)
    with Image.open(eval_image(out)) as im:
        image = im.convert("RGB")
    torch.testing.assert_close(
        logits(merged, processor, image), logits(trained, processor, image), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(FileExistsError, match="not overwriting"):
        api.merge_checkpoint(out / "final", merged_dir)
    with pytest.raises(ValueError, match="no adapters to merge"):
        api.merge_checkpoint(merged_dir, tmp_path / "again")
    with pytest.raises(ValueError, match="no adapters to merge"):
        api.merge_checkpoint(out / "pretrain" / "final", tmp_path / "pretrain")
    assert not (tmp_path / "again").exists() and not (tmp_path / "pretrain").exists()
    # the default output: `<src>-merged` beside the source
    default = api.merge_checkpoint(out / "share" / "final")
    assert default == (out / "share" / "final-merged").resolve() and not read_meta(default)["llm_base"]


def test_export_checkpoint_merges_the_adapters_and_loads_in_plain_transformers(run, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, _ = run
    exported, notes = api.export_checkpoint(out / "final", tmp_path / "llava", to="hf-llava")
    assert exported == tmp_path / "llava" and any("visual tokens" in n for n in notes)
    hf_model = AutoModelForImageTextToText.from_pretrained(exported).eval()
    hf_proc = AutoProcessor.from_pretrained(exported)
    trained, processor = api.load(out / "final")
    with Image.open(eval_image(out)) as im:
        image = im.convert("RGB")
    prompt = processor.prompt([("human", QUESTION)], [image])
    with torch.no_grad():
        hf_logits = hf_model(**prompt).logits
    # the LoRA run's answer, through transformers' LLaVA (the adapters folded in)
    torch.testing.assert_close(hf_logits, logits(trained, processor, image), rtol=1e-4, atol=1e-4)
    inputs = hf_proc(
        images=image,
        text=hf_proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}],
            add_generation_prompt=True,
        ),
        return_tensors="pt",
    )
    assert inputs["input_ids"].tolist() == prompt["input_ids"].tolist()
    with pytest.raises(FileExistsError, match="not overwriting"):
        api.export_checkpoint(out / "final", exported, to="hf-llava")
    with pytest.raises(ConfigError, match="unknown export format.*did you mean 'hf-llava'"):
        api.export_checkpoint(out / "final", tmp_path / "x", to="hf-lava")
    assert not (tmp_path / "x").exists()


def test_resolve_config_reloads_a_saved_config_with_overrides(run, tmp_path):
    out, _ = run
    saved = out / "config.yaml"
    cfg, sources = api.resolve_config(config=saved, overrides=["stages.finetune.lr=1e-4"])
    assert cfg.stages["finetune"].lr == 1e-4 and sources["stages.finetune.lr"] == "override"
    assert list(cfg.stages) == STAGES and cfg.stages["share"].tune["llm"] == "lora"
    assert sources["stages.share.tune.llm"] == "config:config.yaml"
    assert cfg.stages["pretrain"].max_steps == 2 and cfg.lora.r == 4
    assert cfg.model.llm.config["hidden_size"] == 64
    assert cfg.output_dir is None  # a new run, in a new directory
    # without config: the preset, recipe and --tune
    fresh, fresh_sources = api.resolve_config("toy", "share", ["stages.finetune.lr=1e-4"], tune="lora")
    assert fresh.stages["finetune"].tune["llm"] == "lora" and fresh_sources["stages.finetune.tune.llm"] == "--tune lora"
    assert fresh.stages["pretrain"].tune["llm"] == "frozen"
    with pytest.raises(ConfigError, match="--tune applies to a recipe"):
        api.resolve_config(config=saved, tune="lora")
    with pytest.raises(ConfigError, match="with --config, set the parts as overrides"):
        api.resolve_config(config=saved, llm=str(tmp_path))
    with pytest.raises(ConfigError, match="with --config"):
        api.resolve_config(config=saved, vision=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        api.resolve_config(config=tmp_path / "nowhere.yaml")
    with pytest.raises(ConfigError, match="unknown connector"):
        api.resolve_config(config=saved, overrides=["model.connector.type=mlp"])


# --------------------------------------------------------------------------- no run needed


def test_plan_follows_the_recipe_and_the_budget():
    result = api.plan("toy", "share", TINY)
    cfg, _ = api.resolve_config("toy", "share", TINY)
    assert isinstance(result, RunPlan) and result.preset == "toy" and result.recipe == "share"
    assert [s.name for s in result.stages] == list(cfg.stages) == STAGES
    for s in result.stages:
        assert s.micro_batch == cfg.stages[s.name].micro_batch_size and s.seq_len == cfg.stages[s.name].max_len
        assert s.total > 0 and s.tune == cfg.stages[s.name].tune
    assert result.budget == 24 * 2**30 and result.fits and result.device == "cuda"
    assert api.plan(budget="16GB").budget == 16 * 2**30
    assert [s.name for s in api.plan("toy", "base").stages] == ["pretrain", "finetune"]
    lora = api.plan(tune="lora", micro_batch=2, device="cpu")
    assert lora.device == "cpu" and all(s.micro_batch == 2 for s in lora.stages)
    assert [s.tune["llm"] for s in lora.stages] == ["frozen", "lora", "lora"]
    with pytest.raises(ConfigError, match="not a size"):
        api.plan(budget="lots")


def test_build_gives_a_fresh_model_and_takes_model_overrides():
    model, processor = api.build("toy")
    assert isinstance(model.connector, CONNECTORS.get("mlp2x_gelu"))
    assert processor.num_image_tokens == model.num_image_tokens == 16  # the toy: (64 / 16) ** 2
    assert model.llm.config.hidden_size == 128
    linear, _ = api.build("toy", ["connector.type=linear"])
    prefixed, _ = api.build("toy", ["model.connector.type=linear", "vision.feature_layer=-1"])
    assert isinstance(linear.connector, CONNECTORS.get("linear"))
    assert isinstance(prefixed.connector, CONNECTORS.get("linear"))
    assert len(prefixed.vision.layers) == 4 and len(linear.vision.layers) == 2  # cut at the toy's -3 unless told
    with pytest.raises(ConfigError, match="unknown preset 'tyo'.*did you mean 'toy'"):
        api.build("tyo")


KNOWN = {
    "presets": {"toy", "tinyllava-phi2-siglip-3.1b"},
    "recipes": {"base", "share"},
    "connectors": {"linear", "mlp2x_gelu", "resampler"},
    "templates": {"pretrain", "llama", "phi", "auto"},
    "benchmarks": {"shapes"},
    "accelerate": {"ddp", "fsdp2", "deepspeed-zero3-offload"},
    "instruct": {"instruct-vqa", "instruct-mcvqa", "instruct-caption", "instruct-rec"},
}


@pytest.mark.parametrize("kind", api.LISTINGS)
def test_listing_of_every_kind(kind):
    rows = api.listing(kind)
    assert rows and all(isinstance(n, str) and isinstance(t, str) and t for n, t in rows)
    names = [n for n, _ in rows]
    assert len(names) == len(set(names)) and KNOWN[kind] <= set(names)
    if kind == "presets":
        assert names == zoo.names()


def test_listing_covers_the_kinds_and_suggests_one():
    assert set(api.LISTINGS) == set(KNOWN)
    with pytest.raises(ConfigError, match="unknown listing 'preset'.*did you mean 'presets'"):
        api.listing("preset")


def test_copy_recipe_copies_and_never_overwrites(tmp_path):
    dest = api.copy_recipe("base", tmp_path)
    base_text = recipes.load_recipe("base").path.read_text()
    assert dest == tmp_path / "base.yaml" and dest.read_text() == base_text
    with pytest.raises(FileExistsError, match="already exists; not overwriting"):
        api.copy_recipe("base", tmp_path)
    with pytest.raises(FileExistsError, match="already exists; not overwriting"):
        api.copy_recipe("share", dest)
    assert dest.read_text() == base_text
    mine = api.copy_recipe("share", tmp_path / "mine.yaml")
    assert mine == tmp_path / "mine.yaml" and mine.read_text() == recipes.load_recipe("share").path.read_text()
    cfg, _ = api.resolve_config("toy", str(mine))  # the copy runs as a recipe file
    assert cfg.recipe == "mine" and list(cfg.stages) == STAGES
    with pytest.raises(ConfigError, match="did you mean 'share'"):
        api.copy_recipe("shar", tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()


def test_register_zoo_adds_a_users_presets(user_zoo):  # noqa: F811
    before = zoo.names()
    assert api.register_zoo(None) == [] and zoo.names() == before
    assert api.register_zoo(user_zoo) == ["mine-tiny", "mine-qwen"]
    assert zoo.names() == before + ["mine-tiny", "mine-qwen"]
    assert "mine-tiny" in dict(api.listing("presets"))
    rows = api.zoo_select(family="toy")
    assert [r["name"] for r in rows] == ["toy", "mine-tiny"] and rows[1]["source"] == str(user_zoo.resolve())
    model, _ = api.build("mine-tiny")
    assert isinstance(model.connector, CONNECTORS.get("linear"))
    assert [s.name for s in api.plan("mine-tiny", "share").stages] == STAGES
    described = api.zoo_describe("mine-tiny")
    counts, missing = api.zoo.counts("mine-tiny")  # not recorded: built on the meta device
    assert missing is None and described["plan"] is None  # the file recommends no recipe
    assert counts["params"] == described["params"]["total"] == sum(p.numel() for p in model.parameters())
    zoo.unregister()
    assert zoo.names() == before
    with pytest.raises(ConfigError, match="unknown preset 'mine-tiny'"):
        api.build("mine-tiny")


def test_convert_checkpoint_writes_a_tinylmm_checkpoint(tmp_path):
    src, _, _ = write_tinyllava(tmp_path / "theirs", llm="llama")
    out, notes = api.convert_checkpoint(src, tmp_path / "ours")
    assert out == tmp_path / "ours" and read_meta(out)["format"] == "tinylmm/2"
    assert isinstance(notes, list) and all(isinstance(n, str) for n in notes)
    assert not (src / "tinylmm.json").exists()  # nothing written into their directory
    converted, processor = api.load(out)
    in_memory, _ = api.load(src)  # load converts their directory in memory: the same model
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    torch.testing.assert_close(logits(converted, processor, image), logits(in_memory, processor, image))
    with pytest.raises(FileExistsError, match="not overwriting"):
        api.convert_checkpoint(src, out)
    with pytest.raises(ConfigError, match=r"unknown checkpoint source \(--from\) 'llava'.*known: tinyllava"):
        api.convert_checkpoint(src, tmp_path / "x", source="llava")
    assert not (tmp_path / "x").exists()


def test_zoo_select_describe_and_counts():
    assert api.zoo_select is api.zoo.select and api.zoo_describe is api.zoo.describe
    rows = api.zoo_select()
    assert [r["name"] for r in rows] == zoo.names()
    assert next(r for r in rows if r["name"] == "toy") == api.zoo.row("toy")
    assert [r["name"] for r in api.zoo_select(family="toy")] == ["toy"]
    small = api.zoo_select(max_params=zoo.parse_count("1B"))
    assert small and len(small) < len(rows) and all(r["params"] <= 1e9 for r in small)
    with pytest.raises(ConfigError, match="did you mean 'qwen3'"):
        api.zoo_select(family="qwen")
    counts, missing = api.zoo.counts("toy")
    assert missing is None
    described = api.zoo_describe("toy", budget_bytes=16 * 2**30)
    stats = api.zoo.stats("toy")
    assert counts["params"] == described["params"]["total"] == stats.total == api.zoo.row("toy")["params"]
    assert counts["visual_tokens"] == described["visual_tokens"] == stats.num_image_tokens == 16
    assert described["name"] == "toy" and described["family"] == "toy"
    plan = described["plan"]
    assert plan["recipe"] == "share" and plan["budget"] == 16 * 2**30 and plan["fits"]
    assert [s["name"] for s in plan["stages"]] == STAGES
    assert api.zoo_describe("toy", plan=False)["plan"] is None
    with pytest.raises(ConfigError, match="did you mean 'toy'"):
        api.zoo_describe("tyo")
