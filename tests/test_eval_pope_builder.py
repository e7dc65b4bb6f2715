"""`tinylmm eval build-pope`: POPE's three splits sampled from a tiny COCO instances file written
here, checked by hand (positives, random / popular / adversarial negatives, the seed), written
in the files LLaVA-1.5 reads, then scored by `eval score --bench pope`; and bad annotations."""

from __future__ import annotations

import json

import pytest
from test_eval_run import eval_cli

from tinylmm.api import build_pope, score_answers
from tinylmm.data.jsonl import read_jsonl
from tinylmm.errors import ConfigError, DataError
from tinylmm.eval.pope_builder import read_coco_objects

NAMES = {1: "person", 2: "car", 3: "dog", 4: "cat", 5: "umbrella", 6: "apple", 7: "bus", 8: "tv", 9: "kite"}
OBJECTS = {  # image id: its annotations' category ids, in annotation order
    1: [1, 2, 1, 3],  # person, car, dog (person twice: asked once)
    2: [1, 2, 7],  # person, car, bus
    3: [4, 3, 8],  # cat, dog, tv
    4: [1, 5, 2],  # person, umbrella, car
    5: [6],  # apple: one object, fewer than K=2: left out, as POPE leaves it out
    6: [1, 3, 4],  # person, dog, cat
}
# Over the 5 images kept: person 4, car 3, dog 3, cat 2, bus 1, tv 1, umbrella 1 (ties by name).
# Co-occurring with person: car 3, dog 2, then bus, cat, umbrella 1; with car: person 3, then bus,
# dog, umbrella; with cat: dog 2, then person, tv; with dog: cat 2, person 2, then car, tv.
# K=2: each image's first two objects asked, each followed by the first absent, not yet asked object.
POPULAR = {1: ["cat", "bus"], 2: ["dog", "cat"], 3: ["person", "car"], 4: ["dog", "cat"], 6: ["car", "bus"]}
ADVERSARIAL = {  # image 4's umbrella co-occurs only with person and car, both in it: a random one
    1: ["bus", "umbrella"],
    2: ["dog", "umbrella"],
    3: ["person", "car"],
    4: ["dog", {"bus", "cat", "tv"}],
    6: ["car", "tv"],
}
SEEN = {"person", "car", "dog", "cat", "umbrella", "bus", "tv"}  # apple's image is left out; kite is never annotated


def file_name(image_id) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def coco(objects=OBJECTS) -> dict:
    annotations = [
        {"id": 100 * im + k, "image_id": im, "category_id": c, "bbox": [0, 0, 1, 1]}
        for im, cats in objects.items()
        for k, c in enumerate(cats)
    ]
    return {
        "info": {},
        "images": [{"id": im, "file_name": file_name(im), "height": 480, "width": 640} for im in objects],
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "thing"} for i, n in NAMES.items()],
    }


def write_coco(tmp_path, data=None, name="instances_val2014.json"):
    path = tmp_path / name
    path.write_text(json.dumps(coco() if data is None else data))
    return path


def asked(label_rows, image_id):
    """(object, label) of one image's questions, in order."""
    rows = [r for r in label_rows if r["image"] == file_name(image_id)]
    return [
        (r["text"].removeprefix("Is there ").split(" ", 1)[1].removesuffix(" in the image?"), r["label"]) for r in rows
    ]


@pytest.fixture
def built(tmp_path):
    report = build_pope(write_coco(tmp_path), tmp_path / "pope", images=5, questions_per_image=2, seed=0)
    return report, tmp_path / "pope"


def test_objects_are_the_distinct_categories_in_annotation_order(tmp_path):
    images = {im.id: im for im in read_coco_objects(write_coco(tmp_path))}
    assert images[1].objects == ("person", "car", "dog") and images[1].file_name == file_name(1)
    assert images[5].objects == ("apple",)


def test_splits_are_popes_sampling(built):
    report, out = built
    assert (report.images, report.eligible, report.too_few) == (5, 5, [5])
    assert report.questions == {"random": 20, "popular": 20, "adversarial": 20}
    splits = {s: read_jsonl(out / "coco" / f"coco_pope_{s}.json") for s in ("random", "popular", "adversarial")}
    for split, rows in splits.items():
        assert file_name(5) not in {r["image"] for r in rows}
        for im, cats in OBJECTS.items():
            if im == 5:
                continue
            present = {NAMES[c] for c in cats}
            pairs = asked(rows, im)
            assert [label for _, label in pairs] == ["yes", "no"] * 2, (split, im)
            assert [o for o, _ in pairs[::2]] == [NAMES[c] for c in dict.fromkeys(cats)][:2]  # the first K objects
            negatives = [o for o, _ in pairs[1::2]]
            assert len(set(negatives)) == 2 and not set(negatives) & present and set(negatives) <= SEEN
            if split == "popular":
                assert negatives == POPULAR[im], im
            if split == "adversarial":
                first, second = ADVERSARIAL[im]
                assert negatives[0] == first and (
                    negatives[1] in second if isinstance(second, set) else negatives[1] == second
                ), im


def test_popular_follows_the_sampled_images_frequencies(tmp_path):
    """Counted over the images sampled, not the file: with 2 of 5 images, whatever they are, the
    popular negatives are the most frequent objects of those 2 absent from the image."""
    out = tmp_path / "pope"
    build_pope(write_coco(tmp_path), out, images=2, questions_per_image=2, seed=3)
    rows = read_jsonl(out / "coco" / "coco_pope_popular.json")
    images = sorted({r["image"] for r in rows})
    assert len(images) == 2
    sampled = {im: [NAMES[c] for c in dict.fromkeys(OBJECTS[im])] for im in OBJECTS if file_name(im) in images}
    freq = {}
    for objs in sampled.values():
        for o in objs:
            freq[o] = freq.get(o, 0) + 1
    ranking = sorted(freq, key=lambda o: (-freq[o], o))
    for im, objs in sampled.items():
        pairs = asked(rows, im)
        expected, excluded = [], set(objs)
        for pos in objs[:2]:
            excluded.add(pos)
            neg = next(o for o in ranking if o not in excluded)  # both images have absent objects of the pair
            excluded.add(neg)
            expected.append(neg)
        assert [o for o, _ in pairs[1::2]] == expected


def test_the_seed_fixes_the_output(tmp_path):
    path = write_coco(tmp_path)
    files = ["llava_pope_test.jsonl", *(f"coco/coco_pope_{s}.json" for s in ("random", "popular", "adversarial"))]

    def build(name, seed):
        build_pope(path, tmp_path / name, images=4, questions_per_image=2, seed=seed)
        return [(tmp_path / name / f).read_text() for f in files]

    first = build("a", 7)
    assert build("b", 7) == first
    assert build("c", 8) != first  # another sample of 4 of the 5 images, or another order


def test_files_are_llavas_pope_layout(built):
    _, out = built
    assert sorted(p.name for p in (out / "coco").iterdir()) == [  # eval_pope.py asserts nothing else is there
        "coco_pope_adversarial.json",
        "coco_pope_popular.json",
        "coco_pope_random.json",
    ]
    questions = read_jsonl(out / "llava_pope_test.jsonl")
    assert [q["category"] for q in questions] == ["adversarial"] * 20 + ["random"] * 20 + ["popular"] * 20
    offsets = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
    for split, offset in offsets.items():
        labels = read_jsonl(out / "coco" / f"coco_pope_{split}.json")
        mine = [q for q in questions if q["category"] == split]
        assert [r["question_id"] for r in labels] == list(range(1, 21))
        assert all(set(r) == {"question_id", "image", "text", "label"} for r in labels)
        assert all(set(q) == {"question_id", "image", "text", "category"} for q in mine)
        for q, lab in zip(mine, labels):  # what LLaVA's eval_pope.py pairs, line by line
            assert q["question_id"] == offset + lab["question_id"] and q["image"] == lab["image"]
            assert q["text"] == lab["text"] + "\nAnswer the question using a single word or phrase."
    texts = {r["text"] for r in read_jsonl(out / "coco" / "coco_pope_adversarial.json")}
    assert "Is there an umbrella in the image?" in texts and "Is there a person in the image?" in texts


def test_eval_score_scores_a_built_folder(built, tmp_path):
    _, out = built
    questions = read_jsonl(out / "llava_pope_test.jsonl")
    labels = {s: read_jsonl(out / "coco" / f"coco_pope_{s}.json") for s in ("random", "popular", "adversarial")}
    offsets = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
    label_of = {offsets[s] + r["question_id"]: r["label"] for s, rows in labels.items() for r in rows}
    # random split answered right, popular always "Yes", adversarial: the first question unanswered
    rows = []
    for q in questions:
        if q["category"] == "adversarial" and q["question_id"] == 1:
            continue
        text = {"random": label_of[q["question_id"]].capitalize() + ".", "popular": "Yes, there is."}.get(
            q["category"], "No"
        )
        rows.append(
            {
                "question_id": q["question_id"],
                "prompt": q["text"],
                "text": text,
                "answer_id": "a",
                "model_id": "m",
                "metadata": {},
            }
        )
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores, _ = score_answers("pope", out, answers)
    s = scores["splits"]
    assert s["random"] == {"n": 20, "accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5}
    assert s["popular"] == pytest.approx(
        {"n": 20, "accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 1.0}
    )
    # all "No": TP 0 -> precision, recall and F1 0; the unanswered yes is scored as "no": still right 10 of 20
    assert s["adversarial"] == {"n": 20, "accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    assert scores["n"] == 60 and scores["missing"] == {"n": 1, "ids": ["1"]}
    assert scores["metrics"]["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_bad_annotations_name_the_file_and_the_image(tmp_path):
    def fails(data, match, **kw):
        path = write_coco(tmp_path, data)
        with pytest.raises(DataError, match=match):
            build_pope(path, tmp_path / "pope", **{"images": 5, "questions_per_image": 2, **kw})

    with pytest.raises(DataError, match=r"missing .*nowhere.json: expected COCO-format instance annotations"):
        build_pope(tmp_path / "nowhere.json", tmp_path / "pope")
    fails({k: v for k, v in coco().items() if k != "categories"}, r"instances_val2014.json: no 'categories' list")
    data = coco()
    del data["annotations"][5]["category_id"]
    fails(data, r"instances_val2014.json: annotations\[5\] \(id 201\) has no 'category_id'")
    data = coco()
    data["annotations"][3]["category_id"] = 42
    fails(data, r"annotations\[3\] \(id 103\) of image 1: unknown category id 42 \(not in 'categories'\)")
    data = coco()
    data["annotations"][0]["image_id"] = 77
    fails(data, r"annotations\[0\] \(id 100\): image id 77 is not in 'images'")
    data = coco()
    del data["images"][2]["file_name"]
    fails(data, r"images\[2\] \(id 3\) has no 'file_name'")
    # K=3: images 1, 2, 3, 4 and 6 have 3 objects, 5 has 1: 5 eligible, not 6
    fails(
        coco(),
        r"5 image\(s\) have at least 3 objects, fewer than the 6 asked for \(--images\); 1 with fewer .*: 5$",
        images=6,
        questions_per_image=3,
    )
    # one image of two objects sampled: nothing absent to ask about (POPE's sampling would loop for ever)
    fails(coco({1: [1, 2], 2: [3]}), r"image 1 \(COCO_val2014_000000000001.jpg\): no absent object left", images=1)
    with pytest.raises(ConfigError, match="--questions-per-image must be at least 1"):
        build_pope(write_coco(tmp_path), tmp_path / "pope", questions_per_image=0)
    build_pope(write_coco(tmp_path), tmp_path / "pope", images=5, questions_per_image=2)
    with pytest.raises(FileExistsError, match="not overwriting a POPE folder"):
        build_pope(write_coco(tmp_path), tmp_path / "pope", images=5, questions_per_image=2)


def test_cli_build_pope(tmp_path):
    path = write_coco(tmp_path)
    out = eval_cli("build-pope", "--annotations", str(path), "--out", str(tmp_path / "pope"), "--images", "4",
                   "--questions-per-image", "2", "--seed", "1")  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "POPE: 4 images of 5 eligible, questions per split: random 16, popular 16, adversarial 16" in out.output
    assert "1 image(s) with fewer than 2 objects left out, as POPE leaves them out: 5" in out.output
    assert len(read_jsonl(tmp_path / "pope" / "llava_pope_test.jsonl")) == 48
    bad = eval_cli("build-pope", "--annotations", str(tmp_path / "x.json"), "--out", str(tmp_path / "p2"))
    assert isinstance(bad.exception, DataError) and "x.json: expected COCO-format" in str(bad.exception)
