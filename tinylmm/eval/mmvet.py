"""MM-Vet, graded by a judge as its official evaluator does (yuweihao/MM-Vet's mm-vet_evaluator.py,
the script form of mm-vet_evaluator.ipynb, which LLaVA-1.5's docs/Evaluation.md points to).

LLaVA's scripts/convert_mmvet_for_eval.py names the answer to question_id N "v1_N", the key of
the question in mm-vet.json ({"v1_N": {"question", "answer", "capability": [...], "imagename"}}).
For each question the evaluator sends one user message, no system message:
    prompt + "\\n" + " | ".join([question, answer with " <AND> " / " <OR> " spaced, prediction, ""])
with `prompt` its few-shot grading table (judge_prompts.yaml, quoted from the evaluator),
temperature 0.0 and max_tokens 3 (its judge: gpt-4-0613). The reply's score: its text up to the
first space, stripped, read as a number, which must lie in 0.0-1.0 ("0.5" is 0.5; "Correctness:
0.7" does not parse). When it does not, the row is sent again with "\\nPredict the correctness
of the answer (digit): " appended, at temperature 0.0, then 0.5, 1.0, 1.5 and 2.0; the replies
to the first four retries are parsed, and when none parses the question scores 0.0 (the
evaluator sends the fifth retry too but does not read its reply; so does this). The questions
that fell back to 0.0 are listed under `fallback`. Here a reply reading as nan or inf does not
parse (Python's float reads them; the evaluator would keep a nan).

The scores: per capability (rec, ocr, know, gen, spat, math), the sum of the scores of the
questions that need it over their number, and `total` over all questions; the evaluator prints
them x 100, rounded to 1 place, capabilities ordered by how many questions need them, as here
(`subtasks`, fractions in 0-1). `integrations` holds its second table, by the set of
capabilities a question needs, named here by the sorted capabilities joined with "_". The
evaluator's --num_run (1 by default, 5 in the paper: the mean of runs) is one run here.

lmms-eval's mmvet task differs (not implemented here): its judge defaults to gpt-4o-2024-11-20
with max_tokens 128, its row ends " | {prediction} |" (one space fewer), and a retry resends the
same row (no "Predict the correctness" line) at a temperature raised by 0.5, until 2.

Beyond the evaluator: a question without an answer scores 0.0 without asking the judge
and is listed under `missing` (the evaluator stops with a KeyError).

Layout (LLaVA's scripts/v1_5/eval/mmvet.sh, MM-Vet's mm-vet.zip):
    mm-vet/mm-vet.json         the questions, answers and capabilities
    mm-vet/llava-mm-vet.jsonl  LLaVA's question file (question_id N, image, text), answered by `eval run`
    mm-vet/images/             the images
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from tinylmm.errors import DataError
from tinylmm.eval.answering import read_question_jsonl
from tinylmm.eval.answers import layout_file, read_answers, read_json
from tinylmm.eval.base import BENCHMARKS
from tinylmm.eval.judge import Judge, prompts

METADATA = "mm-vet.json"
QUESTIONS = "llava-mm-vet.jsonl"
TEMPERATURE = 0.0
MAX_TOKENS = 3
RETRY_TEMPERATURES = (0.0, 0.5, 1.0, 1.5, 2.0)  # the evaluator's, raised by 0.5 after each retry


def parse_correctness(reply: str) -> float | None:
    """The evaluator's parse: the reply up to its first space, a number in 0.0-1.0; else None."""
    try:
        score = float(reply.split(" ")[0].strip())
    except ValueError:
        return None
    return score if math.isfinite(score) and 0.0 <= score <= 1.0 else None


def grading_row(question: str, answer: str, prediction: str) -> str:
    answer = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return prompts()["mmvet"]["prompt"] + "\n" + " | ".join([question, answer, prediction, ""])


def grade(judge: Judge, question: str, answer: str, prediction: str) -> float | None:
    """The judge's score of one prediction, retried as the evaluator does; None when it fell back to 0.0."""
    row = grading_row(question, answer, prediction)
    reply = judge.ask([{"role": "user", "content": row}], temperature=TEMPERATURE, max_tokens=MAX_TOKENS)
    score = parse_correctness(reply)
    retry_row = row + prompts()["mmvet"]["retry_suffix"]
    for i, temperature in enumerate(RETRY_TEMPERATURES):
        if score is not None:
            return score
        reply = judge.ask([{"role": "user", "content": retry_row}], temperature=temperature, max_tokens=MAX_TOKENS)
        if i < len(RETRY_TEMPERATURES) - 1:  # the last retry's reply is not read
            score = parse_correctness(reply)
    return None


def _table(groups: dict[str, list[float]]) -> dict:
    return {name: {"n": len(s), "total": sum(s) / len(s)} for name, s in groups.items()}


def score_mmvet(data: Path, answers_path: Path, rule: str = "llava", *, judge: Judge) -> dict:
    path = layout_file(Path(data), METADATA, "MM-Vet's questions and answers")
    metadata = read_json(path)
    if not isinstance(metadata, dict) or not metadata:
        raise DataError(f"{path}: expected MM-Vet's {{question id: {{question, answer, capability}}}}")
    for qid, entry in metadata.items():
        for name in ("question", "answer", "capability"):
            if not isinstance(entry, dict) or name not in entry:
                raise DataError(f"{path}: question {qid} has no '{name}'")
    answers = read_answers(answers_path, metadata, key=lambda row: f"v1_{row['question_id']}")

    scores, fallback = {}, []
    for qid, entry in metadata.items():
        prediction = answers.get(qid)
        if prediction is None:
            scores[qid] = 0.0
            continue
        score = grade(judge, entry["question"], entry["answer"], prediction)
        if score is None:
            fallback.append(qid)
        scores[qid] = 0.0 if score is None else score

    counts = Counter(c for e in metadata.values() for c in set(e["capability"]))
    by_capability = {
        c: [s for q, s in scores.items() if c in metadata[q]["capability"]] for c, _ in counts.most_common()
    }
    sets = Counter("_".join(sorted(set(e["capability"]))) for e in metadata.values())
    by_set = {
        name: [s for q, s in scores.items() if "_".join(sorted(set(metadata[q]["capability"]))) == name]
        for name, _ in sets.most_common()
    }
    return {
        "bench": "mmvet",
        "rule": rule,
        "n": len(scores),
        "metrics": {"total": sum(scores.values()) / len(scores)},
        "subtasks": _table(by_capability),
        "integrations": _table(by_set),
        "fallback": {"n": len(fallback), "ids": fallback},
        "missing": answers.report(),
    }


@BENCHMARKS.register("mmvet")
class MMVetBenchmark:
    """MM-Vet, each answer graded 0-1 by a judge with MM-Vet's few-shot prompt, per capability."""

    rules = ("llava",)
    judged = True
    images = "images"
    max_new_tokens = 1024  # LLaVA's model_vqa.py, which answers MM-Vet
    score = staticmethod(score_mmvet)

    @staticmethod
    def questions(data: Path):
        return read_question_jsonl(data, QUESTIONS, "LLaVA's MM-Vet question file")
