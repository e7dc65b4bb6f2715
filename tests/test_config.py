import json

import pytest
import yaml

from tinylmm.catalog import zoo
from tinylmm.catalog.recipes import copy_recipe, load_recipe, shipped
from tinylmm.config import (
    ConfigError,
    dump_resolved,
    load_resolved,
    parse_override,
    resolve,
    to_dict,
)
from tinylmm.trainability import parse as parse_trainability


def test_every_shipped_recipe_and_preset_parses():
    assert {"base", "share"} <= set(shipped())
    for name in shipped():
        recipe = load_recipe(name)
        assert recipe.stages and recipe.description
        for preset in zoo.names():
            cfg, _ = resolve(preset, name)
            assert list(cfg.stages) == list(recipe.stages)
            for st in cfg.stages.values():
                assert set(st.tune) == {"vision", "connector", "llm"}
                for v in st.tune.values():
                    parse_trainability(v)
    assert {
        "toy",
        "tinyllava-phi2-siglip-3.1b",
        "tinyllava-stablelm2-siglip-2.0b",
        "tinyllava-tinyllama-siglip-1.5b",
    } <= set(zoo.names())


def test_recipes_follow_the_tinyllava_paper():
    base = resolve("tinyllava-phi2-siglip-3.1b", "base")[0].stages
    assert list(base) == ["pretrain", "finetune"]
    assert base["pretrain"].tune == {"vision": "frozen", "connector": "full", "llm": "frozen"}
    assert base["pretrain"].lr == 1e-3 and base["finetune"].lr == 2e-5
    assert base["finetune"].tune == {"vision": "frozen", "connector": "full", "llm": "full"}
    share = resolve("tinyllava-phi2-siglip-3.1b", "share")[0].stages
    assert list(share) == ["pretrain", "share", "finetune"]
    assert share["share"].tune == {"vision": "partial:12", "connector": "full", "llm": "full"}
    assert share["share"].lr == 2e-5
    for st in list(base.values()) + list(share.values()):
        assert st.warmup_ratio == 0.03 and st.scheduler == "cosine"


@pytest.mark.parametrize(
    "args, message",
    [
        (("toy", "share", ["stages.finetune.lrr=1"]), "did you mean 'lr'"),
        (("toy", "share", ["model.conector.type=linear"]), "did you mean 'connector'"),
        (("toi", "share", []), "did you mean 'toy'"),
        (("toy", "shar", []), "did you mean 'share'"),
        (("toy", "share", ["model.connector.type=mlp2x_gelo"]), "did you mean 'mlp2x_gelu'"),
        (("toy", "share", ["model.template=lama"]), "did you mean 'llama'"),
        (("toy", "share", ["stages.finetun.lr=1"]), "did you mean 'finetune'"),
        (("toy", "share", ["stages.share.tune.vision=partal:3"]), "did you mean"),
        (("toy", "share", ["train.precision=bf61"]), "not one of"),
        (("toy", "share", ["stages.finetune.batch_size=10", "stages.finetune.micro_batch_size=4"]), "not a multiple"),
    ],
)
def test_bad_names_and_keys_are_errors_with_suggestions(args, message):
    with pytest.raises(ConfigError, match=message):
        resolve(*args)


def test_override_values_are_typed_yaml():
    assert parse_override("stages.finetune.lr=1e-4") == (["stages", "finetune", "lr"], 1e-4)
    assert parse_override("model.vision.config={layer_norm_eps: 1e-06, name: 1e-x}")[1] == {
        "layer_norm_eps": 1e-6,
        "name": "1e-x",
    }
    assert parse_override("train.gradient_checkpointing=true")[1] is True
    assert parse_override("eval.bench=[]")[1] == []
    cfg, _ = resolve("toy", "share", ["stages.finetune.lr=3e-4", "model.connector.type=resampler"])
    assert cfg.stages["finetune"].lr == 3e-4 and cfg.model.connector.type == "resampler"


def test_layering_is_recorded_and_saved(tmp_path):
    cfg, sources = resolve("toy", "share", ["stages.finetune.lr=5e-4"])
    # recipe value, replaced by the toy preset's stage default, replaced by the override
    assert sources["stages.finetune.lr"] == "override"
    assert sources["stages.pretrain.lr"] == "recipe:share"
    assert sources["stages.share.tune.vision"] == "preset:toy"
    assert sources["stages.share.tune.llm"] == "recipe:share"
    assert sources["stages.pretrain.data"] == "preset:toy"
    assert cfg.stages["pretrain"].data.shapes == "caption" and cfg.stages["pretrain"].data.json is None
    path = tmp_path / "config.yaml"
    dump_resolved(cfg, sources, path)
    text = path.read_text()
    assert "lr: 0.0005  # override" in text
    assert "vision: partial:1  # preset:toy" in text
    again = load_resolved(path)
    assert to_dict(again) == to_dict(cfg)


def test_partial_layer_specs():
    t = parse_trainability("partial:12")
    assert t.first_index(27) == 12
    with pytest.raises(ConfigError, match="layers"):
        t.first_index(3)
    assert parse_trainability("partial:-1").first_index(3) == 2
    assert parse_trainability("partial:50%").first_index(4) == 2
    with pytest.raises(ConfigError):
        parse_trainability("partial:x")


def test_copy_recipe_never_overwrites(tmp_path):
    dest = copy_recipe("share", tmp_path / "mine.yaml")
    assert yaml.safe_load(dest.read_text()) == yaml.safe_load(load_recipe("share").path.read_text())
    with pytest.raises(FileExistsError, match="already exists"):
        copy_recipe("share", dest)
    cfg, sources = resolve("toy", str(dest))
    assert cfg.recipe == "mine" and "share" in cfg.stages
    # a user's recipe file is taken as written: the toy's stage defaults do not replace its data
    assert cfg.stages["pretrain"].data.json == "data/llava/blip_laion_cc_sbu_558k.json"
    assert sources["stages.pretrain.data"] == "recipe:mine"


def test_recipe_file_with_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  s1:\n    lr: 1.0e-3\n    epoch: 1\n")
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_recipe(str(bad))


def test_overrides_never_change_the_cached_preset():
    from tinylmm.catalog import zoo

    before = json.dumps(zoo.get("toy").model, sort_keys=True)
    resolve("toy", "share", ["model.llm.config.hidden_size=64", "model.vision.config.image_size=32"])
    assert json.dumps(zoo.get("toy").model, sort_keys=True) == before
