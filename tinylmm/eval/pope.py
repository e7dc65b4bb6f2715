"""POPE's scoring rule (RUCAIBox/POPE evaluate.py; LLaVA's eval_pope.py reads answers the
same way): keep the answer's first sentence, drop commas, and read it as "no" when one of
its words is `No`, `not` or `no`, else as "yes". Then, with "yes" the positive class:
accuracy, precision, recall, F1 and the yes-ratio (the share of answers read as yes; 0.5
on POPE's balanced splits for a model with no bias). Precision is 0 when nothing was
answered yes, as is F1 when precision and recall are both 0."""

from __future__ import annotations

from collections.abc import Sequence


def read_yes_no(answer: str) -> str:
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def binary_metrics(answers: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE's metrics of free-text `answers` against "yes"/"no" `labels`."""
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers for {len(labels)} labels")
    if not labels:
        raise ValueError("no answers to score")
    pred = [read_yes_no(a) == "yes" for a in answers]
    gold = [label == "yes" for label in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    tn = len(pred) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": len(pred),
        "accuracy": (tp + tn) / len(pred),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(pred) / len(pred),
    }
