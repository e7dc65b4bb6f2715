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
from tinylmm.data.pope import STRATEGIES
from tinylmm.data.shapes import CELLS, CHOICES, COLORS, EVAL_TYPES, GRID, QUESTION_TYPES, SHAPES, Scene, Shape
from tinylmm.data.templates import TINYLLAVA_SYSTEM

SMALL = dict(n_caption=12, n_instruct=30, n_eval=50, n_pope=6, image_size=64)
TOKENIZER_DIR = Path(shapes.__file__).resolve().parent.parent / "assets" / "toy" / "llm"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "ds"
    paths = shapes.write_shapes_dataset(root, seed=0, **SMALL)
    return {k: (json.loads(p.read_text()) if k != "images" else p) for k, p in paths.items()}


def cell_colors(img: Image.Image) -> dict[str, tuple]:
    """The pixel at the centre of each grid cell (render keeps it inside the cell's shape)."""
    cell = img.size[0] / GRID
    return {c: img.getpixel((int((i % GRID + 0.5) * cell), int((i // GRID + 0.5) * cell))) for i, c in enumerate(CELLS)}


def color_name(rgb) -> str | None:
    return next((n for n, v in COLORS.items() if v == tuple(rgb)), None)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- scenes, rendering, questions ------------------------------------------------------


@pytest.mark.parametrize("size", [48, 64, 96])
def test_render_puts_each_shape_colour_at_its_cell(size):
    rng = random.Random(size)
    for _ in range(300):
        scene = shapes.make_scene(rng)
        assert 1 <= len(scene.shapes) <= 4
        assert len({s.cell for s in scene.shapes}) == len(scene.shapes)
        assert len(set(scene.objects)) == len(scene.shapes)
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
            assert re.search(rf"\ban? {s.color} {s.shape} in {s.cell}\b", text), (text, s)
    one = Scene((Shape("orange", "circle", "row 2, column 3"),))
    assert shapes.caption(one) == "There is 1 shape: an orange circle in row 2, column 3."
    two = Scene((Shape("red", "square", "row 1, column 1"), Shape("blue", "circle", "row 4, column 2")))
    assert shapes.caption(two) == (
        "There are 2 shapes: a red square in row 1, column 1 and a blue circle in row 4, column 2."
    )


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
    elif qtype == "relation":
        x, rel, y = re.fullmatch(r"Is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", q).groups()
        (sx,), (sy,) = ([s for s in objs if s.name == n] for n in (x, y))
        dx, dy = sx.col - sy.col, sx.row - sy.row
        holds = {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[rel]
        assert a == ("yes" if holds else "no") and x != y
    else:
        name = re.fullmatch(r"Is there an? (\w+ \w+) in the image\?", q)[1]
        assert a == ("yes" if scene.has(name) else "no")


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


def test_exist_negatives_follow_pope_strategies():
    rng, stats = random.Random(3), shapes.world_stats()
    answers, shares = Counter(), 0
    for _ in range(600):
        scene = shapes.make_scene(rng)
        q, a = shapes.ask(scene, "exist", rng)
        answers[a] += 1
        if a == "no":
            name = re.fullmatch(r"Is there an? (\w+ \w+) in the image\?", q)[1]
            assert not scene.has(name)
            shares += any(set(name.split()) & set(o.split()) for o in scene.objects)
    assert abs(answers["yes"] / 600 - 0.5) < 0.06
    assert shares / answers["no"] >= 0.5  # adversarial (and often popular) negatives share a colour or shape
    assert stats.popular[0] == shapes._RANKING[0]  # the prior's most popular object is the world's


def test_world_has_popular_and_co_occurring_objects():
    rng = random.Random(4)
    scenes = [shapes.make_scene(rng) for _ in range(3000)]
    freq = Counter(o for s in scenes for o in s.objects)
    assert freq[shapes._RANKING[0]] > 2 * freq[shapes._RANKING[-1]]
    pairs = [(a, b) for s in scenes for a in s.objects for b in s.objects if a < b]
    share = sum(bool(set(a.split()) & set(b.split())) for a, b in pairs) / len(pairs)
    assert share > 0.45  # uniform pairs of distinct objects share a colour or a shape 7/17 = 0.41 of the time


def test_corpus_is_deterministic_and_covers_all_answers():
    a, b = list(shapes.corpus(seed=0, n=50)), list(shapes.corpus(seed=0, n=50))
    assert a == b and a != list(shapes.corpus(seed=1, n=50))
    words = set(" ".join(a).replace("?", " ").replace(".", " ").split())
    assert set(COLORS) | set(SHAPES) | {"yes", "no", "0", "4", "row", "column", "left", "above", "below"} <= words


# --- the written dataset -----------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    small = dict(n_caption=4, n_instruct=4, n_eval=5, n_pope=2, image_size=32)
    a = snapshot(shapes.write_shapes_dataset(tmp_path / "a", seed=7, **small)["images"])
    b = snapshot(shapes.write_shapes_dataset(tmp_path / "b", seed=7, **small)["images"])
    c = snapshot(shapes.write_shapes_dataset(tmp_path / "c", seed=8, **small)["images"])
    assert len(a) == 4 + 4 + 5 + 2 + 4  # images (POPE's 2 too) + three JSONs + meta
    assert a == b
    assert a.keys() == c.keys()
    assert a["caption.json"] != c["caption.json"] and a["images/eval-00000.png"] != c["images/eval-00000.png"]


def test_cache_reuses_and_regenerates_atomically(tmp_path):
    root = tmp_path / "ds"
    small = dict(n_caption=3, n_instruct=3, n_eval=5, n_pope=1, image_size=32)
    paths = shapes.write_shapes_dataset(root, **small)
    assert set(paths) == {"caption", "instruct", "eval", "images"} and paths["images"] == root
    files = [root / "meta.json", paths["caption"], paths["eval"], root / "images" / "caption-00000.png"]
    before = [f.stat().st_mtime_ns for f in files]
    assert shapes.write_shapes_dataset(root, **small) == paths
    assert [f.stat().st_mtime_ns for f in files] == before  # nothing rewritten

    shapes.write_shapes_dataset(root, **{**small, "n_eval": 10})  # other parameters: rebuilt
    assert json.loads((root / "meta.json").read_text())["n_eval"] == 10
    assert len(json.loads(paths["eval"].read_text())) == 10 + 3 * 6  # and one POPE image, 6 questions per split
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
            (cell, color) for color, _, cell in re.findall(r"an? (\w+) (\w+) in (row \d, column \d)", gpt["value"])
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
    ev = [s for s in data["eval"] if "pope_split" not in s]
    assert len(ev) == SMALL["n_eval"]
    types = Counter(s["question_type"] for s in ev)
    assert set(types) == set(EVAL_TYPES) and max(types.values()) - min(types.values()) <= 1
    assert Counter(s["answer"] for s in ev if s["question_type"] == "relation") == {"yes": 5, "no": 5}
    train_images = {(data["images"] / s["image"]).read_bytes() for s in data["caption"] + data["instruct"]}
    for s in data["eval"]:
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
            assert re.fullmatch(r"Is there an? (\w+) \w+ in the image\?", q)[1] in present


def test_pope_splits_follow_pope(data):
    pope = [s for s in data["eval"] if "pope_split" in s]
    images = sorted({s["image"] for s in pope})
    assert len(images) == SMALL["n_pope"]
    objects = {}  # image -> the objects asked with answer yes (3 per image: every scene has 3+)
    for split in STRATEGIES:
        rows = [s for s in pope if s["pope_split"] == split]
        assert [s["answer"] for s in rows] == ["yes", "no"] * 3 * SMALL["n_pope"]
        for image in images:
            asked = asked_about(pope, split, image)
            assert len(set(asked)) == 6
            assert objects.setdefault(image, asked[::2]) == asked[::2]  # the same 3 present objects per split
    # popular: the first absent objects of one ranking, so at most 3 + 4 (present, skipped) distinct ones
    popular = {o for image in images for o in asked_about(pope, "popular", image)[1::2]}
    assert len(popular) <= 7


def asked_about(pope, split, image) -> list[str]:
    return [
        re.fullmatch(r"<image>\nIs there an? (\w+ \w+) in the image\?", s["conversations"][0]["value"])[1]
        for s in pope
        if s["pope_split"] == split and s["image"] == image
    ]


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
        "There are 2 shapes: a red circle in row 1, column 1 and a blue square in row 4, column 4.\n",
    ]:
        assert tok.decode(tok(t)["input_ids"], skip_special_tokens=True) == t


def test_toy_tokenizer_is_compact_on_shapes_text(tok):
    def n(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    assert n(TINYLLAVA_SYSTEM) <= 32
    assert (
        n(
            "There are 4 shapes: an orange triangle in row 1, column 4; a purple circle in row 2, column 2; "
            "a blue square in row 4, column 1 and a purple square in row 3, column 3."
        )
        <= 48
    )
    assert n("What shape is the orange object?") <= 8
    assert n("Is the red circle left of the blue square?") <= 10
    for answers in CHOICES.values():  # answers follow "ASSISTANT: "; one token per word, a cell's comma too
        for a in answers:
            assert n(" " + a) == len(a.replace(",", " ,").split())
