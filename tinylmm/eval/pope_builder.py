"""Building POPE from COCO-format instance annotations (`tinylmm eval build-pope`), as the POPE
paper samples it, into the POPE folder of LLaVA-1.5's eval layout.

The sampling follows RUCAIBox/POPE's main.py and utils.py (the negatives: tinylmm.data.pope):
- an image's objects are the names of its annotations' categories, each once, in the order of
  its first annotation (POPE asks `image["objects"][i]` for i < sample_num: the first ones);
- "Sample images which contain more than sample_num objects" (`len(objects) >= sample_num`):
  an image with fewer than K objects (`--questions-per-image`, POPE's `--sample_num`, 3) is
  left out, and the report says how many and which; then `random.sample` draws N of the rest
  (`--images`, POPE's `--img_num`, 500), and fewer than N left is an error, as POPE's assert is;
- the frequencies (popular) and co-occurrences (adversarial) are counted over those N images,
  and random negatives are drawn among their objects (POPE's `gt_objects_list`);
- each split (random, popular, adversarial, in main.py's order) asks, per image, its first K
  objects (yes), each followed by one absent object not asked yet (no): 2K questions an image;
- the question is POPE's template "Is there a {} in the image?", "an" before a vowel.
One `random.Random(seed)` draws the images, then the random choices of the three splits, so the
seed fixes the output (ties in the rankings are broken by name, see tinylmm.data.pope). Where
POPE's random sampling would loop for ever (no absent object left to ask about), the build
stops with an error naming the image.

The files, as LLaVA-1.5 reads them (checked against haotian-liu/LLaVA's
playground/data/eval/pope/llava_pope_test.jsonl and RUCAIBox/POPE's output/coco/ at e3e39262,
the commit LLaVA's docs/Evaluation.md links):
    coco/coco_pope_{random,popular,adversarial}.json   POPE's label files: JSON lines
        {"question_id", "image", "text", "label"}, question ids from 1 in each file
    llava_pope_test.jsonl   the questions LLaVA answers: {"question_id", "image", "text", "category"},
        the adversarial split, then random, then popular; question id = the label file's id plus
        0, 10000000 and 20000000 respectively; text = the label file's text +
        "\\nAnswer the question using a single word or phrase."
Nothing else is written into coco/: LLaVA's eval_pope.py asserts every file there is a label
file. `image` is COCO's `file_name`; the images themselves are not copied: put COCO's val2014
at DIR/val2014 (pope.sh's --image-folder) or pass `eval run --images`.

Where the released files differ: POPE's utils.py writes "an" questions with
`template.replace("a", "an")`, hence "Is there an umbrella in the imange?" in the files at
e3e39262 that LLaVA uses (44 to 144 questions a split; POPE's later files spell "image");
here the template is not mangled.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from tinylmm.data.pope import STRATEGIES, ObjectStats, pope_questions, question_text
from tinylmm.errors import ConfigError, DataError
from tinylmm.eval.answers import read_json
from tinylmm.eval.pope import QUESTIONS

LLAVA_ORDER = ("adversarial", "random", "popular")  # llava_pope_test.jsonl's order
LLAVA_ID_OFFSET = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt
SHOWN = 10  # image ids quoted in a message


@dataclass(frozen=True)
class CocoImage:
    id: int | str
    file_name: str
    objects: tuple[str, ...]  # distinct category names, in the order of their first annotation


@dataclass
class PopeBuild:
    """What one build wrote, and the images POPE's rule left out."""

    out: Path
    images: int  # images sampled
    eligible: int  # images with at least K objects
    too_few: list = field(default_factory=list)  # ids of images with fewer than K objects
    questions: dict = field(default_factory=dict)  # split -> questions written


def read_coco_objects(path: Path) -> list[CocoImage]:
    """Each image of a COCO-format instances file with its objects, checked: a missing key, an
    unknown image or category id is an error naming the file and the entry."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing {path}: expected COCO-format instance annotations (e.g. instances_val2014.json)")
    coco = read_json(path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco, dict) or not isinstance(coco.get(key), list):
            raise DataError(
                f"{path}: no '{key}' list (COCO instance annotations have images, annotations and categories)"
            )

    def entry(kind: str, i: int, row, needs: tuple[str, ...]):
        if not isinstance(row, dict):
            raise DataError(f"{path}: {kind}[{i}] is not a JSON object")
        for name in needs:
            if name not in row:
                named = f" (id {row['id']})" if "id" in row else ""
                raise DataError(f"{path}: {kind}[{i}]{named} has no '{name}'")
        return row

    names = {}
    for i, c in enumerate(coco["categories"]):
        c = entry("categories", i, c, ("id", "name"))
        names[c["id"]] = str(c["name"])
    files, objects = {}, {}
    for i, im in enumerate(coco["images"]):
        im = entry("images", i, im, ("id", "file_name"))
        if im["id"] in files:
            raise DataError(f"{path}: image id {im['id']} appears twice in 'images'")
        files[im["id"]] = str(im["file_name"])
        objects[im["id"]] = {}
    for i, a in enumerate(coco["annotations"]):
        a = entry("annotations", i, a, ("image_id", "category_id"))
        where = f"{path}: annotations[{i}]" + (f" (id {a['id']})" if "id" in a else "")
        if a["image_id"] not in files:
            raise DataError(f"{where}: image id {a['image_id']} is not in 'images'")
        if a["category_id"] not in names:
            raise DataError(
                f"{where} of image {a['image_id']}: unknown category id {a['category_id']} (not in 'categories')"
            )
        objects[a["image_id"]].setdefault(names[a["category_id"]], None)  # a dict keeps the first-seen order
    return [CocoImage(i, files[i], tuple(objects[i])) for i in files]


def build_pope(
    annotations: Path, out: Path, *, images: int = 500, questions_per_image: int = 3, seed: int = 0
) -> PopeBuild:
    """POPE's three splits sampled from the COCO-format `annotations`, written to `out` as
    LLaVA-1.5's POPE folder (which `out` must not hold already)."""
    annotations, out = Path(annotations), Path(out)
    if images < 1:
        raise ConfigError(f"--images must be at least 1, got {images}")
    if questions_per_image < 1:
        raise ConfigError(f"--questions-per-image must be at least 1, got {questions_per_image}")
    if (out / QUESTIONS).exists():
        raise FileExistsError(f"'{out / QUESTIONS}' exists already; not overwriting a POPE folder")
    k = questions_per_image
    every = read_coco_objects(annotations)
    eligible = [im for im in every if len(im.objects) >= k]
    too_few = [im.id for im in every if len(im.objects) < k]
    if len(eligible) < images:
        raise DataError(
            f"{annotations}: {len(eligible)} image(s) have at least {k} objects, fewer than the {images} "
            f"asked for (--images); {len(too_few)} with fewer were left out, as POPE leaves them out"
            + (f": {', '.join(map(str, too_few[:SHOWN]))}" if too_few else "")
            + (f", ... ({len(too_few) - SHOWN} more)" if len(too_few) > SHOWN else "")
        )
    rng = random.Random(seed)
    sampled = rng.sample(eligible, images)
    stats = ObjectStats.count([im.objects for im in sampled])
    splits = {}
    for strategy in STRATEGIES:
        rows = []
        for im in sampled:
            pairs = pope_questions(im.objects, stats, strategy, rng, sample_num=k)
            if len(pairs) < 2 * k:
                raise DataError(
                    f"{annotations}: image {im.id} ({im.file_name}): no absent object left for its {strategy} "
                    f"negatives: the {len(stats.objects)} objects of the {images} sampled images are all in it "
                    f"or asked already (sample more images, or ask fewer questions per image)"
                )
            rows += [(im.file_name, question_text(obj), label) for obj, label in pairs]
        splits[strategy] = rows
    _write(out, splits)
    return PopeBuild(out, images, len(eligible), too_few, {s: len(r) for s, r in splits.items()})


def _write(out: Path, splits: dict[str, list[tuple[str, str, str]]]) -> None:
    def jsonl(rows) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows)

    (out / "coco").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        labels = [{"question_id": q, "image": im, "text": t, "label": lab} for q, (im, t, lab) in enumerate(rows, 1)]
        (out / "coco" / f"coco_pope_{split}.json").write_text(jsonl(labels))
    questions = [
        {"question_id": LLAVA_ID_OFFSET[split] + q, "image": im, "text": t + SHORT_ANSWER, "category": split}
        for split in LLAVA_ORDER
        for q, (im, t, _) in enumerate(splits[split], 1)
    ]
    (out / QUESTIONS).write_text(jsonl(questions))
