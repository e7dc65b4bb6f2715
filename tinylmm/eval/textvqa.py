"""TextVQA val, scored as LLaVA-1.5's scripts/v1_5/eval/textvqa.sh does it (llava/eval/eval_textvqa.py
with its m4c_evaluator.py, MMF's port of EvalAI's VQA evaluation).

Which question an answer is: LLaVA's TextVQA question files carry the *image* id as `question_id`,
so an answer is matched to the annotation with the same (image_id, question.lower()), the
question read back from the answer's `prompt` (eval_textvqa.py's `prompt_processor`):
    a prompt starting "OCR tokens: " -> the text between "Question: " and " Short answer:"
    a prompt of 3 lines holding "Reference OCR token: " -> its first line, or its second when
        it starts with "Reference OCR token:" (LLaVA-1.5's val_v051_ocr protocol)
    a prompt of 2 lines -> its first line (the question without OCR tokens)

EvalAI's answer normalisation (eval/vqa_accuracy.py has its steps: lower-case; delete "," and
"?"; "'s" -> " 's"; punctuation; digits and articles; contractions), applied to the prediction and
to each of the 10 human answers.

VQA accuracy of a prediction: over the 10 ways to leave one human answer out, the mean of
min(1, matches among the other 9 / 3); `accuracy` is its mean over the questions. LLaVA's
script scores only the questions answered; here an unanswered one scores 0 and is listed
under `missing`.

Layout (LLaVA's docs/Evaluation.md), in textvqa/:
    TextVQA_0.5.1_val.json   TextVQA's annotations: {"data": [{"image_id", "question", "answers"}]}
    llava_textvqa_val_v051_ocr.jsonl   LLaVA's questions (with OCR tokens), answered by `eval run`
                             (`--bench textvqa_no_ocr`: the same questions with the
                             "Reference OCR token:" line left out, the prompt without OCR)
    train_images/            the images (textvqa.sh's --image-folder)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from tinylmm.errors import DataError
from tinylmm.eval.answering import read_question_jsonl
from tinylmm.eval.answers import accuracy_scores, layout_file, read_answers, read_json, with_keys
from tinylmm.eval.base import BENCHMARKS
from tinylmm.eval.vqa_accuracy import evalai_normalize as normalize
from tinylmm.eval.vqa_accuracy import leave_one_out_accuracy

ANNOTATIONS = "TextVQA_0.5.1_val.json"
QUESTIONS = "llava_textvqa_val_v051_ocr.jsonl"


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Mean over the leave-one-out subsets of min(1, matches / 3), after EvalAI's normalisation."""
    return leave_one_out_accuracy(normalize(prediction), [normalize(a) for a in human_answers])


def question_of(prompt: str) -> str:
    """eval_textvqa.py's prompt_processor: the question an answer's prompt asked, lower-cased."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        found = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if found is None:
            raise ValueError(f"an 'OCR tokens: ' prompt without 'Question: ... Short answer:': {prompt!r}")
        question = found.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"a prompt in none of LLaVA's TextVQA forms: {prompt!r}")
    return question.lower()


def _key(image_id, question: str) -> str:
    return f"{image_id}: {question}"


def score_textvqa(data: Path, answers_path: Path, rule: str = "llava") -> dict:
    path = layout_file(Path(data), ANNOTATIONS, "TextVQA's val annotations")
    annotations = read_json(path)
    if not isinstance(annotations, dict) or "data" not in annotations:
        raise DataError(f"{path} has no 'data' list (TextVQA's annotation format)")
    for i, a in enumerate(annotations["data"]):
        with_keys(path, f"data[{i}]", a, ("image_id", "question"))
    # keyed as LLaVA keys them (a repeated image and question keeps its last annotation)
    by_key = {_key(a["image_id"], a["question"].lower()): a for a in annotations["data"]}
    for k, a in by_key.items():
        if len(a.get("answers", [])) != 10:
            raise DataError(f"{path}: question '{k}' has {len(a.get('answers', []))} answers, not TextVQA's 10")

    def key(row: dict) -> str:
        try:
            return _key(row["question_id"], question_of(str(row.get("prompt", ""))))
        except ValueError as e:
            raise DataError(f"{answers_path}: answer to {row['question_id']}: {e}") from None

    answers = read_answers(answers_path, by_key, key=key)
    total = sum(vqa_accuracy(t, a["answers"]) for k, a in by_key.items() if (t := answers.get(k)) is not None)
    return accuracy_scores("textvqa", rule, len(by_key), total, answers)


@BENCHMARKS.register("textvqa")
class TextVQABenchmark:
    """TextVQA val, VQA accuracy after EvalAI's normalisation, from LLaVA-1.5's eval layout."""

    rules = ("llava",)
    score = staticmethod(score_textvqa)
    images = "train_images"

    @staticmethod
    def questions(data: Path):
        return read_question_jsonl(data, QUESTIONS, "LLaVA's TextVQA question file (OCR-token prompts)")


OCR_LINE = "Reference OCR token:"


def without_ocr_tokens(text: str) -> str:
    """LLaVA's val_v051_ocr prompt without its "Reference OCR token: ..." line: the question,
    then "Answer the question using a single word or phrase." (2 lines, which the score reads)."""
    return "\n".join(line for line in text.split("\n") if not line.startswith(OCR_LINE))


@BENCHMARKS.register("textvqa_no_ocr")
class TextVQANoOCRBenchmark(TextVQABenchmark):
    """TextVQA val asked without the OCR tokens (the same questions and scoring as textvqa)."""

    @staticmethod
    def questions(data: Path):
        return [dataclasses.replace(q, text=without_ocr_tokens(q.text)) for q in TextVQABenchmark.questions(data)]
