"""The held-out `shapes` benchmark: one question per image, greedy answers, exact match
after normalisation (case, surrounding spaces and final punctuation), per question type,
with the chance level of each type (1 / number of possible answers). Its existence
questions are POPE's three splits (random, popular, adversarial negatives), also scored by
POPE's rule (`tinylmm.eval.pope`): accuracy, precision, recall, F1 and yes-ratio per split.

`write_shapes_pope` writes those POPE questions in LLaVA's POPE layout, so that `eval run
--bench pope` answers them and `eval score --bench pope` scores them as it scores COCO's: the
question text is the shapes question without its image token, so the prompt is the same."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from PIL import Image

from tinylmm.data.pope import STRATEGIES
from tinylmm.data.shapes import write_shapes_dataset
from tinylmm.data.templates.core import IMAGE_TOKEN
from tinylmm.eval.base import BENCHMARKS
from tinylmm.eval.pope import PopeRow, binary_metrics, write_pope_layout
from tinylmm.models.generation import generate_batch
from tinylmm.schema import ShapesConfig


def normalize(text: str) -> str:
    return text.strip().lower().rstrip(".!?").strip()


def evaluate_shapes(
    model,
    processor,
    shapes_root: Path,
    *,
    out: Path | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 8,
) -> dict:
    eval_json = Path(shapes_root) / "eval.json"
    if not eval_json.exists():
        raise FileNotFoundError(f"no shapes eval split at '{eval_json}'")
    samples = json.loads(eval_json.read_text())
    records = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        convs, images = [], []
        for s in chunk:
            question = s["conversations"][0]["value"]
            convs.append([("human", question)])
            with Image.open(Path(shapes_root) / s["image"]) as im:
                images.append([im.copy()])
        answers = generate_batch(model, processor, convs, images, max_new_tokens=max_new_tokens)
        for s, a in zip(chunk, answers):
            records.append(
                {
                    "id": s["id"],
                    "question_type": s["question_type"],
                    "answer": s["answer"],
                    "prediction": a,
                    "correct": normalize(a) == normalize(s["answer"]),
                    "chance": 1.0 / len(s["choices"]),
                    **({"pope_split": s["pope_split"]} if "pope_split" in s else {}),
                }
            )
    by_type = defaultdict(list)
    for r in records:
        by_type[r["question_type"]].append(r)
    summary = {
        "bench": "shapes",
        "n": len(records),
        "accuracy": sum(r["correct"] for r in records) / len(records),
        "chance": sum(r["chance"] for r in records) / len(records),
        "by_type": {
            t: {
                "n": len(rs),
                "accuracy": sum(r["correct"] for r in rs) / len(rs),
                "chance": sum(r["chance"] for r in rs) / len(rs),
            }
            for t, rs in sorted(by_type.items())
        },
    }
    splits = sorted({r["pope_split"] for r in records if "pope_split" in r}, key=STRATEGIES.index)
    if splits:
        summary["pope"] = {
            split: binary_metrics(
                [r["prediction"] for r in records if r.get("pope_split") == split],
                [r["answer"] for r in records if r.get("pope_split") == split],
            )
            for split in splits
        }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**summary, "predictions": records}, indent=2))
    return summary


def shapes_data_for(model_dir: Path, processor) -> Path:
    """The run's own shapes data if the checkpoint sits in a run directory, else a fresh set
    at the tower's input size (the defaults of ShapesConfig), made once in ~/.cache/tinylmm."""
    for parent in Path(model_dir).resolve().parents:
        candidate = parent / "data" / "shapes"
        if (candidate / "eval.json").exists():
            return candidate
    s, size = ShapesConfig(), processor.image_processor.size
    root = Path.home() / ".cache" / "tinylmm" / f"shapes-{size}"
    return write_shapes_dataset(
        root,
        seed=s.seed,
        n_caption=s.n_caption,
        n_instruct=s.n_instruct,
        n_eval=s.n_eval,
        n_pope=s.n_pope,
        image_size=size,
    )["images"]


def write_shapes_pope(shapes_root: Path, out: Path) -> Path:
    """The shapes world's POPE questions (eval.json's `pope_split` samples) as LLaVA's POPE folder `out`."""
    shapes_root = Path(shapes_root)
    eval_json = shapes_root / "eval.json"
    if not eval_json.exists():
        raise FileNotFoundError(f"no shapes eval split at '{eval_json}'")
    rows = [
        PopeRow(
            image=shapes_root / s["image"],
            text=s["conversations"][0]["value"].removeprefix(f"{IMAGE_TOKEN}\n"),
            label=s["answer"],
            split=s["pope_split"],
        )
        for s in json.loads(eval_json.read_text())
        if "pope_split" in s
    ]
    if not rows:
        raise ValueError(f"{eval_json} has no POPE questions (shapes.n_pope=0)")
    return write_pope_layout(out, rows)


@BENCHMARKS.register("shapes")
class ShapesBenchmark:
    """The built-in shapes world's held-out questions (colour, shape, count, position, relation,
    and existence as POPE's three splits)."""

    evaluate = staticmethod(evaluate_shapes)
    data_for = staticmethod(shapes_data_for)
