"""GQA testdev-balanced, scored as LLaVA-1.5's scripts/v1_5/eval/gqa.sh does it.

LLaVA's scripts/convert_gqa_for_eval.py turns each answer into a prediction:
    text = res['text'].rstrip('.').lower()
then GQA's official eval.py (`--tier testdev_balanced`) compares, for each question of
`testdev_balanced_questions.json`: `correct = (predicted == gold)` with gold its "answer", and
counts it in the accuracy `if question["isBalanced"]`. The official script stops on a
question with no prediction (KeyError); here it is scored wrong and listed under `missing`.

Layout (LLaVA's docs/Evaluation.md: GQA's data and eval scripts under gqa/data):
    gqa/data/testdev_balanced_questions.json   GQA's questions: {question id: {"answer", "isBalanced", ...}}
    gqa/llava_gqa_testdev_balanced.jsonl      LLaVA's question file, answered by `eval run`
    gqa/data/images/                          the images (gqa.sh's --image-folder)
"""

from __future__ import annotations

from pathlib import Path

from tinylmm.errors import DataError
from tinylmm.eval.answering import read_question_jsonl
from tinylmm.eval.answers import accuracy_scores, layout_file, read_answers, read_json, with_keys
from tinylmm.eval.base import BENCHMARKS

QUESTIONS = "data/testdev_balanced_questions.json"
LLAVA_QUESTIONS = "llava_gqa_testdev_balanced.jsonl"


def convert(text: str) -> str:
    """LLaVA's conversion of an answer to a GQA prediction."""
    return text.rstrip(".").lower()


def score_gqa(data: Path, answers_path: Path, rule: str = "llava") -> dict:
    path = layout_file(Path(data), QUESTIONS, "GQA's testdev-balanced questions")
    questions = read_json(path)
    if not isinstance(questions, dict):
        raise DataError(f"{path}: GQA's questions are a JSON object {{question id: question}}")
    for qid, q in questions.items():
        with_keys(path, f"question {qid}", q, ("answer",))
    answers = read_answers(answers_path, questions)
    balanced = [qid for qid, q in questions.items() if q.get("isBalanced", True)]
    right = sum(
        (text := answers.get(qid)) is not None and convert(text) == questions[qid]["answer"] for qid in balanced
    )
    return accuracy_scores("gqa", rule, len(balanced), right, answers)


@BENCHMARKS.register("gqa")
class GQABenchmark:
    """GQA testdev-balanced, LLaVA's conversion and GQA's exact match, from LLaVA-1.5's eval layout."""

    rules = ("llava",)
    score = staticmethod(score_gqa)
    images = "data/images"

    @staticmethod
    def questions(data: Path):
        return read_question_jsonl(data, LLAVA_QUESTIONS, "LLaVA's GQA testdev-balanced question file")
