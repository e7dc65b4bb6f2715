"""MME, scored as LLaVA-1.5's scripts/v1_5/eval/mme.sh does it: LLaVA's
`convert_answer_to_mme.py` (in its eval.zip, under MME/) turns the answer file into MME's
result files, then MME's official `eval_tool/calculation.py` (BradyFU/Awesome-Multimodal-
Large-Language-Models, Evaluation branch) scores them.

Layout (LLaVA's docs/Evaluation.md), in MME/:
    llava_mme.jsonl                        LLaVA's questions: question_id "<subtask>/<image file>",
                                           image (relative to the folder below), text
    MME_Benchmark_release_version/<subtask>/
        questions_answers_YN/<stem>.txt    ground truth, when the subtask has an images/ folder
        images/<stem>.jpg                  (artwork, celebrity, landmark, posters, scene)
        <stem>.txt and <stem>.png|jpg      else, side by side (the other nine subtasks)
    Each ground-truth file is one image's questions, one line each: "<question>\\t<Yes|No>".

Which question an answer is (convert_answer_to_mme.py): the subtask is the question id's part
before the first "/", the ground-truth file the id's last part with its extension replaced by
".txt", the question the answer's `prompt` with "Answer the question using a single word or
phrase." removed and stripped, then " Please answer yes or no." appended when absent (or with
two spaces before it where the ground truth has it so). An answer matching no ground-truth
question is an unknown id (LLaVA's script stops there with a KeyError).

calculation.py's rule, per subtask:
    the answer lower-cased; read as "yes"/"no" when it is exactly that, else as "yes" when its
    first 4 characters contain "yes", else "no" when they contain "no", else "other" (wrong)
    acc = right answers / questions; acc+ = images whose two questions are both right / images
    score = (acc + acc+) x 100, at most 200
perception = the sum of the scores of its 10 subtasks (existence, count, position, color,
posters, celebrity, scene, landmark, artwork, OCR; at most 2000), cognition that of its 4
(commonsense_reasoning, numerical_calculation, text_translation, code_reasoning; at most 800).
calculation.py pairs an image's two questions as consecutive lines of the result file (the
answer file's order); here they are paired by their ground-truth file, so the order does not
matter. A question with no answer is scored wrong ("other") and listed under `missing`.

Rule `lmms-eval` (lmms-eval's lmms_eval/tasks/mme/utils.py, `parse_pred_ans`, from Otter):
the answer is lower-cased, stripped and has every "." removed first, and a one-character
answer "y" / "n" reads as yes / no; the rest is the same (its per-image mean of acc + acc+
equals the subtask's acc + acc+, every image having two questions). lmms-eval reads the
hub copy lmms-lab/MME, not this layout, and prompts with its own post_prompt.

Answered by a model (`eval run --bench mme`): the questions of llava_mme.jsonl, images from
MME_Benchmark_release_version/ (mme.sh's --image-folder) unless given.
"""

from __future__ import annotations

from pathlib import Path

from tinylmm.errors import DataError
from tinylmm.eval.answering import read_question_jsonl
from tinylmm.eval.answers import read_answers
from tinylmm.eval.base import BENCHMARKS

QUESTIONS = "llava_mme.jsonl"
RELEASE = "MME_Benchmark_release_version"
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SHORT_ANSWER = "Answer the question using a single word or phrase."
YES_OR_NO = " Please answer yes or no."


def read_official(answer: str) -> str:
    """calculation.py's reading of an answer: "yes", "no" or "other"."""
    text = answer.lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    return "no" if "no" in text[:4] else "other"


def read_lmms_eval(answer: str) -> str:
    """lmms-eval's reading: stripped, without ".", and "y" / "n" accepted."""
    text = answer.lower().strip().replace(".", "")
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    return read_official(text)


READERS = {"llava": read_official, "lmms-eval": read_lmms_eval}


def _key(subtask: str, file: str, question: str) -> str:
    return f"{subtask}/{file}: {question}"


def read_ground_truth(data: Path) -> dict[str, dict[str, dict[str, str]]]:
    """{subtask: {ground-truth file: {question: "yes"|"no"}}} for the 14 subtasks."""
    release = Path(data) / RELEASE
    truth = {}
    for subtask in PERCEPTION + COGNITION:
        folder = release / subtask
        if not folder.is_dir():
            raise DataError(
                f"missing {folder}: expected MME's '{subtask}' subtask "
                f"('{RELEASE}/{subtask}' in the benchmark folder {data})"
            )
        qa = folder / "questions_answers_YN" if (folder / "images").is_dir() else folder
        files = {}
        for path in sorted(qa.glob("*.txt")):
            questions = {}
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2 or parts[1].lower() not in ("yes", "no"):
                    raise DataError(f"{path} line {i}: not '<question>\\t<Yes|No>' (MME's ground-truth format)")
                questions[parts[0]] = parts[1].lower()
            if len(questions) != 2:
                raise DataError(f"{path} has {len(questions)} questions; MME has 2 per image (acc+ pairs them)")
            files[path.name] = questions
        if not files:
            raise DataError(f"{qa} holds no ground-truth .txt file for MME's '{subtask}' subtask")
        truth[subtask] = files
    return truth


def answer_key(truth: dict, question_id: str, prompt: str) -> str:
    """convert_answer_to_mme.py's matching of an answer to a ground-truth question (docstring)."""
    subtask = question_id.split("/")[0]
    file = question_id.split("/")[-1].split(".")[0] + ".txt"
    if SHORT_ANSWER in prompt:
        prompt = prompt.replace(SHORT_ANSWER, "").strip()
    if "Please answer yes or no." not in prompt:
        known = truth.get(subtask, {}).get(file, {})
        prompt = prompt + YES_OR_NO
        if prompt not in known:
            prompt = prompt.replace(YES_OR_NO, " " + YES_OR_NO)
    return _key(subtask, file, prompt)


def subtask_scores(truth: dict[str, dict[str, str]], read: dict[str, str]) -> dict:
    """acc, acc+ and score of one subtask; `read` maps a question's key to its reading."""
    right = total = both = 0
    for questions in truth.values():  # one ground-truth file (image) each
        ok = [read.get(k) == gt for k, gt in questions.items()]
        right, total, both = right + sum(ok), total + len(ok), both + all(ok)
    acc, acc_plus = right / total, both / len(truth)
    return {"n": total, "acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100}


def score_mme(data: Path, answers_path: Path, rule: str = "llava") -> dict:
    data = Path(data)
    truth = read_ground_truth(data)
    keyed = {
        subtask: {file: {_key(subtask, file, q): gt for q, gt in qs.items()} for file, qs in files.items()}
        for subtask, files in truth.items()
    }
    expected = [k for files in keyed.values() for qs in files.values() for k in qs]

    def key(row: dict) -> str:
        return answer_key(truth, str(row["question_id"]), str(row.get("prompt", "")))

    answers = read_answers(answers_path, expected, key=key)
    reader = READERS[rule]
    read = {k: reader(t) for k in expected if (t := answers.get(k)) is not None}
    subtasks = {name: subtask_scores(keyed[name], read) for name in PERCEPTION + COGNITION}
    return {
        "bench": "mme",
        "rule": rule,
        "n": len(expected),
        "metrics": {
            "perception": sum(subtasks[s]["score"] for s in PERCEPTION),
            "cognition": sum(subtasks[s]["score"] for s in COGNITION),
        },
        "subtasks": subtasks,
        "points": ["perception", "cognition", "score"],  # the rest are fractions
        "missing": answers.report(),
    }


@BENCHMARKS.register("mme")
class MMEBenchmark:
    """MME, 14 yes/no subtasks, acc + acc+ in points, from LLaVA-1.5's eval layout (answered, answers scored)."""

    rules = tuple(READERS)
    score = staticmethod(score_mme)
    images = RELEASE

    @staticmethod
    def questions(data: Path):
        return read_question_jsonl(data, QUESTIONS, "LLaVA's MME question file")
