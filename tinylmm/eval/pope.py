"""POPE's scoring, by two rules; and the `pope` benchmark, which scores answer files in
LLaVA-1.5's eval layout.

Rule `llava` (the default; LLaVA's `llava/eval/eval_pope.py`, which reads answers as
RUCAIBox/POPE's evaluate.py does): "Only keep the first sentence" (the text before the first
`.`), drop commas, split on spaces, and read the answer as "no" when one of its words is
`No`, `not` or `no`, else as "yes".

Rule `lmms-eval` (lmms-eval's `lmms_eval/tasks/pope/utils.py`, `pope_process_results`):
`pred = results[0].lower().strip()`, exact match against the label; an answer that is
neither "yes" nor "no" after that is neither a positive nor a negative prediction (its
`pope_aggregate_recall` counts a false negative only when `pred == "no"`).

Then, with "yes" the positive class: accuracy (predictions equal to the label), precision
TP / (TP + FP), recall TP / (TP + FN), F1, and the yes-ratio: the share of predictions read as
"yes" (0.5 on POPE's balanced splits for a model with no bias; LLaVA's definition; lmms-eval's
own `pope_yes_ratio` counts the *labels*, always 0.5, and is not followed). Precision is 0 when
nothing was answered yes, as is F1 when precision and recall are both 0 (lmms-eval's guards;
LLaVA's script divides by zero there).

The `pope` benchmark (LLaVA's docs/Evaluation.md, scripts/v1_5/eval/pope.sh):
    pope/llava_pope_test.jsonl                 the questions: question_id, image, text, category
    pope/coco/coco_pope_{random,popular,adversarial}.json
                                               POPE's label files, JSON lines with `label`
LLaVA's eval_pope.py pairs the answers of a category with that category's label file line by
line; here the k-th question of a category in llava_pope_test.jsonl takes the k-th label of its
split (the images must agree), so the answer file's order does not matter. LLaVA-1.5 used POPE at
commit e3e39262, whose random split has 2910 questions (8910 in all); later POPE has 3000 each.

Reported: per split, and in `metrics` the mean of each metric over the splits. LLaVA-1.5's
paper reports the mean F1 of the three splits; TinyLLaVA's table reports accuracy.

Answered by a model (`eval run --bench pope`): the questions of llava_pope_test.jsonl, images
from `pope/val2014/` (pope.sh's `--image-folder`) unless given. `write_pope_layout` writes this
layout from (image, question, label, split) rows: label files in POPE's own format
(`{"question_id", "image", "text", "label"}`, RUCAIBox/POPE's output/coco/), question ids
numbered from 1 across the splits in the order given, each image copied once into val2014/.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tinylmm.data.jsonl import read_jsonl
from tinylmm.data.pope import STRATEGIES
from tinylmm.errors import DataError, unknown
from tinylmm.eval.answering import read_question_jsonl
from tinylmm.eval.answers import layout_file, read_answers
from tinylmm.eval.base import BENCHMARKS

QUESTIONS = "llava_pope_test.jsonl"
IMAGES = "val2014"
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def read_yes_no(answer: str) -> str:
    """LLaVA's (and POPE's) reading of a free-text answer: always "yes" or "no"."""
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def read_exact(answer: str) -> str:
    """lmms-eval's reading: the answer lower-cased and stripped, anything but yes/no kept as is."""
    return answer.lower().strip()


READERS: dict[str, Callable[[str], str]] = {"llava": read_yes_no, "lmms-eval": read_exact}


def binary_metrics(answers: Sequence[str], labels: Sequence[str], rule: str = "llava") -> dict[str, float]:
    """POPE's metrics of free-text `answers` against "yes"/"no" `labels`, answers read by `rule`."""
    if rule not in READERS:
        raise unknown("POPE rule", rule, READERS)
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers for {len(labels)} labels")
    if not labels:
        raise ValueError("no answers to score")
    if bad := sorted({g for g in labels if g not in ("yes", "no")}):
        raise ValueError(f"POPE labels are 'yes' or 'no', not {', '.join(map(repr, bad))}")
    pred = [READERS[rule](a) for a in answers]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(pred, labels))
    fn = sum(p == "no" and g == "yes" for p, g in zip(pred, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": len(pred),
        "accuracy": sum(p == g for p, g in zip(pred, labels)) / len(pred),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in pred) / len(pred),
    }


def _split_labels(data: Path, questions: list[dict], split: str) -> list[tuple[str, str]]:
    """(question id, label) of the split's questions, paired in order with its label file."""
    rel = f"coco/coco_pope_{split}.json"
    label_path = layout_file(data, rel, f"POPE's {split} label file")
    labels = read_jsonl(label_path)
    mine = [q for q in questions if q.get("category") == split]
    if len(mine) != len(labels):
        raise DataError(
            f"{data / QUESTIONS} has {len(mine)} '{split}' questions but {label_path} has {len(labels)} labels"
        )
    pairs = []
    for k, (q, lab) in enumerate(zip(mine, labels), 1):
        if "label" not in lab or lab["label"] not in ("yes", "no"):
            raise DataError(f"{label_path} line {k}: no 'label' of yes/no")
        if "image" in q and "image" in lab and q["image"] != lab["image"]:
            raise DataError(
                f"{label_path} line {k} is about {lab['image']} but the {k}-th '{split}' question "
                f"(id {q['question_id']}) of {data / QUESTIONS} is about {q['image']}"
            )
        pairs.append((str(q["question_id"]), lab["label"]))
    return pairs


def score_pope(data: Path, answers_path: Path, rule: str = "llava") -> dict:
    data = Path(data)
    questions = read_jsonl(layout_file(data, QUESTIONS, "LLaVA's POPE question file"))
    for i, q in enumerate(questions, 1):
        if "question_id" not in q or q.get("category") not in STRATEGIES:
            raise DataError(
                f"{data / QUESTIONS} line {i}: needs a question_id and a category of {', '.join(STRATEGIES)}"
            )
    labelled = {split: _split_labels(data, questions, split) for split in STRATEGIES}
    answers = read_answers(answers_path, [q["question_id"] for q in questions])
    splits = {}
    for split, pairs in labelled.items():
        # a missing answer is scored wrong: it stands for the label's opposite under both rules
        texts = [
            a if (a := answers.get(qid)) is not None else ("no" if label == "yes" else "yes") for qid, label in pairs
        ]
        splits[split] = binary_metrics(texts, [label for _, label in pairs], rule)
    return {
        "bench": "pope",
        "rule": rule,
        "n": len(questions),
        "metrics": {m: sum(s[m] for s in splits.values()) / len(splits) for m in METRICS},
        "splits": splits,
        "missing": answers.report(),
    }


def pope_questions_of(data: Path):
    return read_question_jsonl(data, QUESTIONS, "LLaVA's POPE question file")


@dataclass(frozen=True)
class PopeRow:
    """One POPE question to write: the image file, the question, its label and split."""

    image: Path
    text: str
    label: str
    split: str


def write_pope_layout(out: Path, rows: Iterable[PopeRow]) -> Path:
    """LLaVA's POPE folder at `out` (must not hold one already): questions, label files, images."""
    out = Path(out)
    if (out / QUESTIONS).exists():
        raise FileExistsError(f"'{out / QUESTIONS}' exists already; not overwriting a POPE folder")
    (out / "coco").mkdir(parents=True, exist_ok=True)
    (out / IMAGES).mkdir(exist_ok=True)
    questions, labels = [], {split: [] for split in STRATEGIES}
    for qid, row in enumerate(rows, 1):
        if row.split not in labels or row.label not in ("yes", "no"):
            raise ValueError(f"POPE question {qid}: split {row.split!r}, label {row.label!r}")
        name = Path(row.image).name
        if not (out / IMAGES / name).exists():
            shutil.copyfile(row.image, out / IMAGES / name)
        questions.append({"question_id": qid, "image": name, "text": row.text, "category": row.split})
        labels[row.split].append({"question_id": qid, "image": name, "text": row.text, "label": row.label})

    def jsonl(rows) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows)

    for split, rows_ in labels.items():
        (out / "coco" / f"coco_pope_{split}.json").write_text(jsonl(rows_))
    (out / QUESTIONS).write_text(jsonl(questions))
    return out


@BENCHMARKS.register("pope")
class PopeBenchmark:
    """POPE (object hallucination) on COCO, 3 splits, from LLaVA-1.5's eval layout (answered, answers scored)."""

    rules = tuple(READERS)
    score = staticmethod(score_pope)
    questions = staticmethod(pope_questions_of)
    images = IMAGES
