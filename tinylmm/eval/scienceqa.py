"""ScienceQA-IMG, scored as LLaVA's `llava/eval/eval_science_qa.py` does.

LLaVA's parse of an answer's text, with options A-E (`--options`, its default):
    if pred_text in args.options: answer = pred_text
    elif len(pred_text) >= 3 and pred_text[0] in args.options and pred_text[1:3] == ". ": answer = pred_text[0]
    else: re.compile(r'The answer is ([A-Z]).').findall(pred_text), used if it finds exactly one,
          else answer = "FAILED"
then `get_pred_idx`: the letter's index if it is among the first len(choices) options, else -1;
the answer is right when that index is the problem's `answer`. A question with no answer is
"FAILED" (wrong), as in LLaVA's script.

Layout (LLaVA's docs/Evaluation.md, scripts/v1_5/eval/sqa.sh), in scienceqa/:
    llava_test_CQM-A.json   LLaVA's questions: [{"id", "conversations", "image"?}]
    problems.json           ScienceQA's problems: {pid: {"choices", "answer", ...}}
    pid_splits.json         ScienceQA's splits: {"test": [pid, ...], ...}
The scored questions are the test split's. `img_accuracy` is over those with an image (an
"image" in llava_test_CQM-A.json). LLaVA's script tells image questions by '<image>' in the
answer's prompt, so an unanswered image question leaves its IMG total there; here it stays
in, counted wrong.

Answered by a model (`eval run --bench scienceqa`) as LLaVA-1.5's scripts/v1_5/eval/sqa.sh runs
`llava/eval/model_vqa_science.py --single-pred-prompt`: the question is the first turn's value
with `<image>` removed and stripped, then "\n" + "Answer with the option's letter from the given
choices directly."; an image question gets the image token before it, and its recorded
`prompt` starts "<image>\n". Images from scienceqa/images/test/ (its --image-folder).
"""

from __future__ import annotations

import re
from pathlib import Path

from tinylmm.errors import DataError
from tinylmm.eval.answering import Question
from tinylmm.eval.answers import layout_file, read_answers, read_json, with_keys
from tinylmm.eval.base import BENCHMARKS

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
QUESTIONS = "llava_test_CQM-A.json"


def parse_choice(text: str) -> str:
    """The letter LLaVA's eval_science_qa.py reads from `text`, or "FAILED"."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def choice_index(letter: str, n_choices: int) -> int:
    """LLaVA's get_pred_idx: the letter's index among the problem's options, else -1."""
    return OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1


def score_scienceqa(data: Path, answers_path: Path, rule: str = "llava") -> dict:
    data = Path(data)
    questions = read_json(layout_file(data, QUESTIONS, "LLaVA's ScienceQA test questions"))
    problems = read_json(layout_file(data, "problems.json", "ScienceQA's problems.json"))
    splits = read_json(layout_file(data, "pid_splits.json", "ScienceQA's pid_splits.json"))
    if "test" not in splits:
        raise DataError(f"{data / 'pid_splits.json'} has no 'test' split")
    test = [str(p) for p in splits["test"]]
    if not isinstance(questions, list):
        raise DataError(f"{data / QUESTIONS}: LLaVA's ScienceQA questions are a JSON list")
    rows = [with_keys(data / QUESTIONS, f"question {i}", q, ("id",)) for i, q in enumerate(questions)]
    has_image = {str(q["id"]): "image" in q for q in rows}
    for pid in test:
        if pid not in problems:
            raise DataError(f"test problem {pid} of {data / 'pid_splits.json'} is not in {data / 'problems.json'}")
        with_keys(data / "problems.json", f"problem {pid}", problems[pid], ("choices", "answer"))
        if pid not in has_image:
            raise DataError(
                f"test problem {pid} of {data / 'pid_splits.json'} is not in {data / 'llava_test_CQM-A.json'}"
            )
    answers = read_answers(answers_path, test)
    right, failed = {}, 0
    for pid in test:
        text = answers.get(pid)
        letter = FAILED if text is None else parse_choice(text)
        failed += letter == FAILED
        right[pid] = choice_index(letter, len(problems[pid]["choices"])) == problems[pid]["answer"]
    img = [pid for pid in test if has_image[pid]]
    return {
        "bench": "scienceqa",
        "rule": rule,
        "n": len(test),
        "metrics": {
            "img_accuracy": sum(right[p] for p in img) / len(img) if img else 0.0,
            "accuracy": sum(right.values()) / len(test) if test else 0.0,
        },
        "n_img": len(img),
        "failed": failed,  # answers no parse could read ("FAILED"), unanswered ones included
        "missing": answers.report(),
    }


def scienceqa_questions(data: Path) -> list[Question]:
    path = layout_file(Path(data), QUESTIONS, "LLaVA's ScienceQA test questions")
    out = []
    for i, line in enumerate(read_json(path)):
        try:
            asked = str(line["conversations"][0]["value"]).replace("<image>", "").strip()
            qid = line["id"]
        except (KeyError, IndexError, TypeError):
            raise DataError(f"{path}: question {i} has no 'id' or no first turn in 'conversations'") from None
        text = f"{asked}\n{SINGLE_PRED_PROMPT}"
        image = line.get("image")
        out.append(Question(qid, image, text, recorded=f"<image>\n{text}" if image is not None else None))
    return out


@BENCHMARKS.register("scienceqa")
class ScienceQABenchmark:
    """ScienceQA test (IMG accuracy and overall), LLaVA's answer parse, from LLaVA-1.5's eval layout."""

    rules = ("llava",)
    score = staticmethod(score_scienceqa)
    questions = staticmethod(scienceqa_questions)
    images = "images/test"
