"""The toy preset's pretrained backbones: shipped files against their manifest, loading them
like hub weights, and the script that makes them (scripts/pretrain_toy.py) in a tiny setting."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from tinylmm.data import shapes
from tinylmm.resources import asset

ROOT = Path(__file__).resolve().parent.parent
TOY = asset("toy")
MANIFEST = json.loads((TOY / "manifest.json").read_text())


def load_script():
    spec = importlib.util.spec_from_file_location("pretrain_toy", ROOT / "scripts" / "pretrain_toy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped_files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def test_shipped_files_match_the_manifest():
    assert shipped_files(TOY) == MANIFEST["sha256"]  # every file listed, nothing unlisted, same bytes
    assert {"llm/config.json", "llm/model.safetensors", "llm/tokenizer.json", "siglip/config.json"} <= set(
        MANIFEST["sha256"]
    )
    assert sum(p.stat().st_size for p in TOY.rglob("*") if p.is_file()) < 8 * 2**20  # a few MB


def test_manifest_records_how_they_were_made():
    assert MANIFEST["seed"] == 0 and set(MANIFEST["wall_s"]) == {"llm", "siglip"}
    assert all(seconds > 0 for seconds in MANIFEST["wall_s"].values())
    llm, tower = MANIFEST["llm"], MANIFEST["siglip"]
    assert llm["steps"] > 0 and llm["documents"] > 0 and tower["steps"] > 0 and tower["images"] > 0
    assert llm["answer_loss_last"] < llm["answer_loss_first"] / 4
    assert tower["sigmoid_loss_last"] < tower["sigmoid_loss_first"] / 4
    # what the LLM brings: answers from the described scene, above chance on every type
    acc = llm["heldout_text_answer_accuracy"]
    assert set(acc) == set(shapes.QUESTION_TYPES)
    assert all(acc[t] >= 1 / len(shapes.CHOICES[t]) + 0.1 for t in acc), acc
    assert tower["heldout_image_to_caption_top1"] >= 0.5  # chance: 1 / heldout_pairs


def test_the_toy_preset_loads_them_with_from_pretrained():
    from safetensors.torch import load_file

    import tinylmm

    model, processor = tinylmm.build("toy")
    llm_weights = load_file(str(TOY / "llm" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.llm.state_dict()[name], llm_weights[name])
    tower_weights = load_file(str(TOY / "siglip" / "model.safetensors"))
    key = next(k for k in tower_weights if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    got = {k: v for k, v in model.vision.state_dict().items() if k.endswith("encoder.layers.0.mlp.fc1.weight")}
    assert len(got) == 1 and torch.equal(next(iter(got.values())), tower_weights[key])
    assert model.num_image_tokens == 16  # a 4 x 4 grid of visual tokens
    assert processor.image_processor.size == 64


def test_descriptions_list_objects_without_their_number():
    script = load_script()
    rng = random.Random(0)
    for _ in range(100):
        scene = shapes.make_scene(rng)
        text = script.describe(scene, rng)
        assert "There " not in text and text.count(" in row ") == len(scene.shapes)
        assert all(f"{s.name} in {s.cell}" in text for s in scene.shapes)


def test_the_llm_reads_the_scene_where_and_as_the_lmm_puts_the_image():
    import tinylmm

    script = load_script()
    tokenizer = script.build_tokenizer()
    world = script.TextWorld(tokenizer)
    _, processor = tinylmm.build("toy")
    rng = random.Random(1)
    scene = shapes.Scene(
        (shapes.Shape("red", "circle", "row 1, column 2"), shapes.Shape("blue", "square", "row 3, column 4"))
    )
    turns = [("human", "<image>\nWhere is the red circle?"), ("gpt", "row 1, column 2")]
    ids, labels, content = world.encode(scene, "llama", turns, rng, cells=True)
    lmm = processor.encode(turns)
    assert (ids, labels) == (lmm.input_ids, lmm.labels)  # the LMM's exact sequence and labels
    assert ids.count(world.image_id) == 16
    # the slots: cell k holds its object's two word ids, reading order, -1 where empty
    red, circle, blue, square = (
        tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("red", "circle", "blue", "square")
    )
    assert content[1] == [red, circle] and content[11] == [blue, square]
    assert sum(c == [-1, -1] for c in content) == 14
    slots = script.CellSlots(8)
    words = torch.nn.Embedding(512, 8)
    vectors = slots(words, torch.tensor([content]))[0]
    with torch.no_grad():
        assert torch.allclose(vectors[1], words.weight[red] + words.weight[circle] + slots.row[0] + slots.col[1])
        assert torch.allclose(vectors[0], slots.empty + slots.row[0] + slots.col[0])
    ids_words, _, none = world.encode(scene, "llama", turns, rng, cells=False)  # the scene in words instead
    assert none is None and world.image_id not in ids_words and len(ids_words) > len(ids) - 16


@pytest.mark.slow
def test_the_script_rebuilds_deterministically_in_a_tiny_setting(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

    script = load_script()
    tiny = [
        "--llm-steps",
        "3",
        "--tower-steps",
        "2",
        "--llm-docs",
        "64",
        "--llm-batch-size",
        "4",
        "--tower-batch-size",
        "4",
        "--heldout",
        "8",
    ]
    a = script.main(["--out", str(tmp_path / "a"), *tiny])
    b = script.main(["--out", str(tmp_path / "b"), *tiny])
    assert a["sha256"] == b["sha256"] == shipped_files(tmp_path / "a")  # same seed, same bytes
    assert set(a["sha256"]) == set(MANIFEST["sha256"])  # the shipped layout
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["llm"]["steps"] == 3
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "llm")
    assert len(AutoTokenizer.from_pretrained(tmp_path / "a" / "llm")) <= llm.config.vocab_size == 512
    assert SiglipVisionModel.from_pretrained(tmp_path / "a" / "siglip").config.patch_size == 16
    c = script.main(["--out", str(tmp_path / "c"), "--seed", "1", *tiny])
    assert c["sha256"]["llm/model.safetensors"] != a["sha256"]["llm/model.safetensors"]


def test_an_unknown_builtin_name_is_an_error_with_a_suggestion():
    import tinylmm
    from tinylmm.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown built-in model 'toy-lm' \\(did you mean 'toy-llm'\\?\\)"):
        tinylmm.build("toy", ["model.llm.name_or_path=builtin:toy-lm"])
