"""TextVQA val, scored as LLaVA-1.5's scripts/v1_5/eval/textvqa.sh does it (llava/eval/eval_textvqa.py
with its m4c_evaluator.py, MMF's port of EvalAI's VQA evaluation).

Which question an answer is: LLaVA's TextVQA question files carry the *image* id as `question_id`,
so an answer is matched to the annotation with the same (image_id, question.lower()), the
question read back from the answer's `prompt` (eval_textvqa.py's `prompt_processor`):
    a prompt starting "OCR tokens: " -> the text between "Question: " and " Short answer:"
    a prompt of 3 lines holding "Reference OCR token: " -> its first line, or its second when
        it starts with "Reference OCR token:" (LLaVA-1.5's val_v051_ocr protocol)
    a prompt of 2 lines -> its first line (the question without OCR tokens)

EvalAI's answer normalisation, applied to the prediction and to each of the 10 human answers:
  1. lower-case; delete "," and "?"; "'s" -> " 's"; newlines and tabs -> spaces; strip.
  2. punctuation  ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !  each deleted when the text holds it
     next to a space (or holds a comma between digits), else replaced by a space; then every "."
     not followed by a digit is deleted (at most 32 of them: the reference passes re.UNICODE
     where re.sub takes its count).
  3. per word: the number words none/zero..ten become digits, the articles a/an/the are
     dropped, and a contraction written without one of its apostrophes gets it back
     ("dont" -> "don't", "couldnt've" -> "couldn't've"); words joined by single spaces.
The contraction table is written here from that rule; EvalAI's own table has a few entries
that differ (capitalised keys such as "Im", which never match after lower-casing, and
"somebody'd" mapped to "somebodyd").

VQA accuracy of a prediction: over the 10 ways to leave one human answer out, the mean of
min(1, matches among the other 9 / 3); `accuracy` is its mean over the questions. LLaVA's
script scores only the questions answered; here an unanswered one scores 0 and is listed
under `missing`.

Layout (LLaVA's docs/Evaluation.md), in textvqa/:
    TextVQA_0.5.1_val.json   TextVQA's annotations: {"data": [{"image_id", "question", "answers"}]}
    llava_textvqa_val_v051_ocr.jsonl   LLaVA's questions (with OCR tokens), answered by `eval run`
    train_images/            the images (textvqa.sh's --image-folder)
"""

from __future__ import annotations

import re
from pathlib import Path

from tinylmm.errors import DataError
from tinylmm.eval.answering import read_question_jsonl
from tinylmm.eval.answers import accuracy_scores, layout_file, read_answers, read_json, with_keys
from tinylmm.eval.base import BENCHMARKS

ANNOTATIONS = "TextVQA_0.5.1_val.json"
QUESTIONS = "llava_textvqa_val_v051_ocr.jsonl"
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}
NUMBERS |= {"six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# English contractions whose apostrophe-less spelling is not itself a word ("we'd" -> "wed" is left out)
CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't
shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd
where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't
wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()


def _without_one_apostrophe(word: str) -> list[str]:
    return [word[:i] + word[i + 1 :] for i, c in enumerate(word) if c == "'"]


CONTRACTIONS = {bare: word for word in CONTRACTED for bare in _without_one_apostrophe(word)}
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or _DIGIT_COMMA.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)


def normalize(answer: str) -> str:
    """EvalAI's normalisation of a VQA answer (the steps in the module docstring)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Mean over the leave-one-out subsets of min(1, matches / 3), after normalisation."""
    pred, humans = normalize(prediction), [normalize(a) for a in human_answers]
    return sum(min(1.0, sum(h == pred for j, h in enumerate(humans) if j != i) / 3) for i in range(len(humans))) / len(
        humans
    )


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
