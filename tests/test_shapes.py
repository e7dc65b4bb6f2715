"""The built-in `shapes` dataset and the toy tokenizer shipped with the package."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tinylmm.data import shapes
from tinylmm.data.shapes import CELLS, CHOICES, COLORS, QUESTION_TYPES, SHAPES, Scene, Shape
from tinylmm.data.templates import TINYLLAVA_SYSTEM

SMALL = dict(n_caption=12, n_instruct=30, n_eval=50, image_size=64)
TOKENIZER_DIR = Path(shapes.__file__).resolve().parent.parent / "assets" / "toy-tokenizer"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "ds"
    paths = shapes.write_shapes_dataset(root, seed=0, **SMALL)
    return {k: (json.loads(p.read_text()) if k != "images" else p) for k, p in paths.items()}


def cell_colors(img: Image.Image) -> dict[str, tuple]:
    """The pixel at the centre of each grid cell (render keeps it inside the cell's shape)."""
    half = img.size[0] / 2
    return {c: img.getpixel((int((i % 2 + 0.5) * half), int((i // 2 + 0.5) * half))) for i, c in enumerate(CELLS)}


def color_name(rgb) -> str | None:
    return next((n for n, v in COLORS.items() if v == tuple(rgb)), None)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- scenes, rendering, questions ------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 96])
def test_render_puts_each_shape_colour_at_its_cell(size):
    rng = random.Random(size)
    for _ in range(300):
        scene = shapes.make_scene(rng)
        assert 1 <= len(scene.shapes) <= 3
        assert len({s.cell for s in scene.shapes}) == len(scene.shapes)
        assert len({(s.color, s.shape) for s in scene.shapes}) == len(scene.shapes)
        img = shapes.render(scene, size, rng)
        assert img.size == (size, size) and img.mode == "RGB"
        got = {c: color_name(px) for c, px in cell_colors(img).items()}
        want = {c: None for c in CELLS} | {s.cell: s.color for s in scene.shapes}
        assert got == want


def test_caption_mentions_every_shape():
    rng = random.Random(1)
    for _ in range(200):
        scene = shapes.make_scene(rng)
        text = shapes.caption(scene)
        n = len(scene.shapes)
        assert text.startswith("There is 1 shape: " if n == 1 else f"There are {n} shapes: ")
        for s in scene.shapes:
            assert re.search(rf"\ban? {s.color} {s.shape} at the {s.cell}\b", text), (text, s)
    one = Scene((Shape("orange", "circle", "top left"),))
    assert shapes.caption(one) == "There is 1 shape: an orange circle at the top left."


def check_answer(scene: Scene, qtype: str, q: str, a: str) -> None:
    assert a in CHOICES[qtype]
    objs = scene.shapes
    if qtype == "color":
        kind = re.fullmatch(r"What color is the (\w+)\?", q)[1]
        assert [s.color for s in objs if s.shape == kind] == [a]
    elif qtype == "shape":
        color = re.fullmatch(r"What shape is the (\w+) object\?", q)[1]
        assert [s.shape for s in objs if s.color == color] == [a]
    elif qtype == "count":
        m = re.fullmatch(r"How many (\w+)s are there\?", q)
        want = len(objs) if m[1] == "shape" else sum(s.shape == m[1] for s in objs)
        assert a == str(want)
    elif qtype == "position":
        color, kind = re.fullmatch(r"Where is the (\w+) (\w+)\?", q).groups()
        assert [s.cell for s in objs if (s.color, s.shape) == (color, kind)] == [a]
    else:
        color, kind = re.fullmatch(r"Is there an? (\w+) (\w+)\?", q).groups()
        assert a == ("yes" if scene.has(color, kind) else "no")


def test_answers_are_true_for_the_scene():
    rng = random.Random(2)
    seen = Counter()
    for _ in range(300):
        scene = shapes.make_scene(rng)
        for qtype in QUESTION_TYPES:
            qa = shapes.ask(scene, qtype, rng)
            assert (qa is None) == (qtype not in shapes.applicable(scene))
            if qa is not None:
                check_answer(scene, qtype, *qa)
                seen[qtype, qa[1]] += 1
    for qtype in QUESTION_TYPES:  # every answer of every type does occur
        assert all(seen[qtype, a] > 0 for a in CHOICES[qtype]), qtype


def test_exist_is_balanced_with_hard_negatives():
    rng = random.Random(3)
    answers, hard = Counter(), 0
    for _ in range(600):
        scene = shapes.make_scene(rng)
        q, a = shapes.ask(scene, "exist", rng)
        answers[a] += 1
        if a == "no":
            color, kind = re.fullmatch(r"Is there an? (\w+) (\w+)\?", q).groups()
            assert not scene.has(color, kind)
            hard += any(s.color == color or s.shape == kind for s in scene.shapes)
    assert abs(answers["yes"] / 600 - 0.5) < 0.06
    assert hard / answers["no"] >= 0.5  # half forced hard, the random half sometimes is


def test_corpus_is_deterministic_and_covers_all_answers():
    a, b = list(shapes.corpus(seed=0, n=50)), list(shapes.corpus(seed=0, n=50))
    assert a == b and a != list(shapes.corpus(seed=1, n=50))
    words = set(" ".join(a).replace("?", " ").replace(".", " ").split())
    assert set(COLORS) | set(SHAPES) | {"yes", "no", "0", "1", "2", "3", "top", "bottom", "left", "right"} <= words


# --- the written dataset -----------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    small = dict(n_caption=4, n_instruct=4, n_eval=5, image_size=32)
    a = snapshot(shapes.write_shapes_dataset(tmp_path / "a", seed=7, **small)["images"])
    b = snapshot(shapes.write_shapes_dataset(tmp_path / "b", seed=7, **small)["images"])
    c = snapshot(shapes.write_shapes_dataset(tmp_path / "c", seed=8, **small)["images"])
    assert len(a) == 4 + 4 + 5 + 4  # images + three JSONs + meta
    assert a == b
    assert a.keys() == c.keys()
    assert a["caption.json"] != c["caption.json"] and a["images/eval-00000.png"] != c["images/eval-00000.png"]


def test_cache_reuses_and_regenerates_atomically(tmp_path):
    root = tmp_path / "ds"
    small = dict(n_caption=3, n_instruct=3, n_eval=5, image_size=32)
    paths = shapes.write_shapes_dataset(root, **small)
    assert set(paths) == {"caption", "instruct", "eval", "images"} and paths["images"] == root
    files = [root / "meta.json", paths["caption"], paths["eval"], root / "images" / "caption-00000.png"]
    before = [f.stat().st_mtime_ns for f in files]
    assert shapes.write_shapes_dataset(root, **small) == paths
    assert [f.stat().st_mtime_ns for f in files] == before  # nothing rewritten

    shapes.write_shapes_dataset(root, **{**small, "n_eval": 10})  # other parameters: rebuilt
    assert json.loads((root / "meta.json").read_text())["n_eval"] == 10
    assert len(json.loads(paths["eval"].read_text())) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temp or stale dirs left behind


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        shapes.write_shapes_dataset(tmp_path, n_caption=1, n_instruct=1, n_eval=1, image_size=32)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_caption_split_matches_images(data):
    assert [s["id"] for s in data["caption"]] == [f"caption-{i:05d}" for i in range(SMALL["n_caption"])]
    for s in data["caption"]:
        human, gpt = s["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"][len("<image>\n") :] in shapes.CAPTION_PROMPTS
        img = Image.open(data["images"] / s["image"])
        assert img.size == (64, 64)
        mentioned = dict(
            (cell, color) for color, _, cell in re.findall(r"an? (\w+) (\w+) at the ([a-z]+ [a-z]+)", gpt["value"])
        )
        got = {c: color_name(px) for c, px in cell_colors(img).items()}
        assert got == {c: mentioned.get(c) for c in CELLS}, gpt["value"]


def test_instruct_samples_are_valid_llava(data):
    assert len(data["instruct"]) == SMALL["n_instruct"]
    for s in data["instruct"]:
        assert set(s) == {"id", "image", "conversations"}
        assert (data["images"] / s["image"]).is_file()
        convs = s["conversations"]
        assert 6 <= len(convs) <= 12 and len(convs) % 2 == 0
        assert [t["from"] for t in convs] == ["human", "gpt"] * (len(convs) // 2)
        assert convs[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in convs) == 1
        questions = [t["value"].removeprefix("<image>\n") for t in convs[::2]]
        assert len(set(questions)) == len(questions)
        assert all(t["value"] and "<image>" not in t["value"] for t in convs[1::2])


def test_eval_split_is_balanced_and_agrees_with_images(data):
    ev = data["eval"]
    assert len(ev) == SMALL["n_eval"]
    types = Counter(s["question_type"] for s in ev)
    assert set(types) == set(QUESTION_TYPES) and max(types.values()) - min(types.values()) <= 1
    assert Counter(s["answer"] for s in ev if s["question_type"] == "exist") == {"yes": 5, "no": 5}
    train_images = {(data["images"] / s["image"]).read_bytes() for s in data["caption"] + data["instruct"]}
    for s in ev:
        assert s["choices"] == CHOICES[s["question_type"]] and s["answer"] in s["choices"]
        human, gpt = s["conversations"]
        assert human["value"].startswith("<image>\n") and gpt == {"from": "gpt", "value": s["answer"]}
        q, a = human["value"].removeprefix("<image>\n"), s["answer"]
        image = (data["images"] / s["image"]).read_bytes()
        assert image not in train_images
        colors = {c: color_name(px) for c, px in cell_colors(Image.open(data["images"] / s["image"])).items()}
        present = [c for c in colors.values() if c]
        if s["question_type"] == "position":
            assert colors[a] == re.fullmatch(r"Where is the (\w+) \w+\?", q)[1]
        elif s["question_type"] == "color":
            assert a in present
        elif q == "How many shapes are there?":
            assert a == str(len(present))
        elif s["question_type"] == "exist" and a == "yes":
            assert re.fullmatch(r"Is there an? (\w+) \w+\?", q)[1] in present


# --- the toy tokenizer -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_toy_tokenizer_specials_and_round_trip(tok):
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    assert len(tok) <= 512  # the toy LLM's vocab_size
    text = "USER: <something> ASSISTANT: red</s>"
    enc = tok(text, return_offsets_mapping=True)
    ids = enc["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1:].count(tok.bos_token_id) == 0
    assert ids[-1] == tok.eos_token_id and tok.convert_ids_to_tokens(ids[-1]) == "</s>"
    assert tok("<s></s>", add_special_tokens=False)["input_ids"] == [1, 2]
    assert enc["offset_mapping"][0] == (0, 0) and enc["offset_mapping"][-1] == (len(text) - 4, len(text))
    for t in [
        text.removesuffix("</s>"),
        "Héllo, wörld! 🙂\n\ttabs  and  spaces ",
        TINYLLAVA_SYSTEM,
        "There are 2 shapes: a red circle at the top left and a blue square at the bottom right.\n",
    ]:
        assert tok.decode(tok(t)["input_ids"], skip_special_tokens=True) == t


def test_toy_tokenizer_is_compact_on_shapes_text(tok):
    def n(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    assert n(TINYLLAVA_SYSTEM) <= 32
    assert (
        n(
            "There are 3 shapes: an orange triangle at the top right, a purple circle at the bottom left "
            "and a purple square at the bottom right."
        )
        <= 32
    )
    assert n("What shape is the orange object?") <= 8
    for answers in CHOICES.values():  # answers follow "ASSISTANT: "; one token each, positions two
        for a in answers:
            assert n(" " + a) == len(a.split())
