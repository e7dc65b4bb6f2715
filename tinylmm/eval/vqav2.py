"""VQAv2 val, scored by the official VQA evaluation (GT-Vision-Lab/VQA vqaEval.py).

LLaVA-1.5 ships only test-dev (vqav2/llava_vqav2_mscoco_test-dev2015.jsonl, scored by the
EvalAI server); val is scored here from VQAv2's own files.

Layout, in vqav2/:
    v2_OpenEnded_mscoco_val2014_questions.json   VQAv2's questions: {"questions": [{"question_id",
                                                 "image_id", "question"}]}
    v2_mscoco_val2014_annotations.json           VQAv2's annotations: {"annotations": [{"question_id",
                                                 "answer_type", "answers": [{"answer", ...}] (10)}]}
    val2014/                                     COCO's val2014 images (COCO_val2014_<image_id:012>.jpg)
    llava_vqav2_mscoco_val2014.jsonl             optional: LLaVA-format questions ({"question_id",
                                                 "image", "text"}), asked instead when present

Asked (`eval run --bench vqav2`) with LLaVA's short-answer prompt (docs/Evaluation.md, as
scripts/v1_5/eval/vqav2.sh asks test-dev through model_vqa_loader.py):
"<question>\\nAnswer the question using a single word or phrase.", the image first.

Scored (`eval score --bench vqav2`), per question of the annotations (all of them, as the
official evaluation wants; an unanswered one scores 0 and is listed under `missing`):
    rule llava (default): the prediction through LLaVA's scripts/convert_vqav2_for_submission.py
        (EvalAIAnswerProcessor), then vqaEval.py as the server runs it: the prediction with
        newlines and tabs made spaces, stripped, processPunctuation, processDigitArticle; the
        human answers through processPunctuation only, and only when they are not all the same;
    rule lmms-eval (tasks/vqav2/utils.py): no conversion; the prediction and every human answer
        stripped, then EvalAIAnswerProcessor's process_punctuation and process_digit_article
        (its comma rule: one or more commas between digits).
eval/vqa_accuracy.py has the steps. Then, as vqaEval.py: over the 10 ways to leave one human
answer out, the mean of min(1, matches among the other 9 / 3); `accuracy` is its mean over the
questions, and `answer_types` the same per answer type (yes/no, number, other), each
{"n", "accuracy"}.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tinylmm.errors import DataError
from tinylmm.eval.answering import Question, read_question_jsonl
from tinylmm.eval.answers import layout_file, read_answers, read_json
from tinylmm.eval.base import BENCHMARKS
from tinylmm.eval.vqa_accuracy import (
    EVALAI_COMMA,
    VQA_COMMA,
    evalai_normalize,
    leave_one_out_accuracy,
    process_digit_article,
    process_punctuation,
)

QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS = "v2_mscoco_val2014_annotations.json"
LLAVA_QUESTIONS = "llava_vqav2_mscoco_val2014.jsonl"
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."


def _spaced(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def official_accuracy(prediction: str, human_answers: list[str]) -> float:
    """vqaEval.py's accuracy of one prediction (the module docstring)."""
    pred = process_digit_article(process_punctuation(_spaced(prediction), VQA_COMMA))
    humans = human_answers
    if len(set(humans)) > 1:  # unanimous answers are compared unprocessed
        humans = [process_punctuation(a, VQA_COMMA) for a in humans]
    return leave_one_out_accuracy(pred, humans)


def lmms_eval_accuracy(prediction: str, human_answers: list[str]) -> float:
    """lmms-eval's vqav2_process_results: both sides processed alike, EvalAI's comma rule."""

    def process(text: str) -> str:
        return process_digit_article(process_punctuation(_spaced(text), EVALAI_COMMA))

    return leave_one_out_accuracy(process(prediction), [process(a) for a in human_answers])


RULES = {
    "llava": lambda prediction, humans: official_accuracy(evalai_normalize(prediction), humans),
    "lmms-eval": lmms_eval_accuracy,
}


def read_annotations(data: Path) -> dict[str, dict]:
    """VQAv2's annotations by question id (str), each with its answer type and human answers."""
    path = layout_file(Path(data), ANNOTATIONS, "VQAv2's val annotations")
    content = read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("annotations"), list):
        raise DataError(f"{path} has no 'annotations' list (VQAv2's annotation format)")
    out = {}
    for i, a in enumerate(content["annotations"]):
        qid = str(a.get("question_id", f"#{i}"))
        answers = a.get("answers")
        if not answers or not all(isinstance(h, dict) and "answer" in h for h in answers) or "answer_type" not in a:
            raise DataError(f"{path}: question {qid} lacks 'question_id', 'answer_type' or 'answers' with an 'answer'")
        if qid in out:
            raise DataError(f"{path}: question {qid} is annotated twice")
        out[qid] = {"answer_type": a["answer_type"], "answers": [str(h["answer"]) for h in answers]}
    return out


def score_vqav2(data: Path, answers_path: Path, rule: str = "llava") -> dict:
    annotations = read_annotations(data)
    answers = read_answers(answers_path, annotations)
    accuracy = RULES[rule]
    scores = {q: 0.0 if (t := answers.get(q)) is None else accuracy(t, a["answers"]) for q, a in annotations.items()}
    by_type = defaultdict(list)
    for qid, a in annotations.items():
        by_type[a["answer_type"]].append(scores[qid])
    n = len(annotations)
    return {
        "bench": "vqav2",
        "rule": rule,
        "n": n,
        "metrics": {"accuracy": sum(scores.values()) / n if n else 0.0},
        "answer_types": {t: {"n": len(s), "accuracy": sum(s) / len(s)} for t, s in sorted(by_type.items())},
        "missing": answers.report(),
    }


def vqav2_questions(data: Path) -> list[Question]:
    data = Path(data)
    if (data / LLAVA_QUESTIONS).is_file():
        return read_question_jsonl(data, LLAVA_QUESTIONS, "a LLaVA-format VQAv2 val question file")
    path = layout_file(data, QUESTIONS, "VQAv2's val questions")
    content = read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("questions"), list):
        raise DataError(f"{path} has no 'questions' list (VQAv2's question format)")
    out = []
    for i, q in enumerate(content["questions"]):
        if not all(k in q for k in ("question_id", "image_id", "question")):
            raise DataError(f"{path}: question {i} lacks 'question_id', 'image_id' or 'question'")
        text = f"{q['question']}\n{SHORT_ANSWER_PROMPT}"
        out.append(Question(q["question_id"], f"COCO_val2014_{int(q['image_id']):012d}.jpg", text))
    return out


@BENCHMARKS.register("vqav2")
class VQAv2Benchmark:
    """VQAv2 val, VQA accuracy by the official evaluation, per answer type."""

    rules = tuple(RULES)
    score = staticmethod(score_vqav2)
    questions = staticmethod(vqav2_questions)
    images = "val2014"
