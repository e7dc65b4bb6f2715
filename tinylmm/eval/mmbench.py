"""MMBench-dev (English), asked as LLaVA-1.5 asks it and scored by MMBench's circular evaluation,
locally, with MMBench's rule-based choice extraction and no GPT fallback.

Layout (LLaVA's docs/Evaluation.md), in mmbench/:
    mmbench_dev_20230712.tsv   MMBench's dev questions, a row per pass, the image base64 inside:
        index, question, hint, A, B, C, D, answer, category, l2-category, image, ...
MMBench's TSV already holds the passes of its CircularEval: a question with N options has N
rows, index i (its main row) and i + k * 1e6 (k = 1..N-1) with the options shifted and the
answer letter moved with them (MMBench's README; its evaluators group rows by index % 1e6). The
image column may also name another row's index instead (VLMEvalKit's TSVs keep one copy).

Asked (`eval run --bench mmbench`) as LLaVA-1.5's scripts/v1_5/eval/mmbench.sh runs
llava/eval/model_vqa_mmbench.py --single-pred-prompt: a row's options are its A..D up to the
first empty one (a field pandas' read_table reads as NaN: empty, "nan", "None", "NA", "N/A",
"null", ...); the question is `hint + "\\n" + question` (no hint when it is NaN), then
"\\n" + letter + ". " + option for each; then "\\n" + "Answer with the option's letter from the
given choices directly."; the image comes first. Each answer records
    {"question_id": index, "round_id", "prompt": the question with its options (no image token,
     no suffix), "text", "options", "option_char", "answer_id", "model_id", "metadata"}
A question the TSV holds in one row only (no passes: a TSV of main rows) is asked as that
script's --all-rounds asks it: once per rotation, round r showing options[r:] + options[:r]
as A, B, ..., "option_char" the TSV letters in that order. Where the TSV holds the passes each
row is asked once (round_id 0), as mmbench.sh does: rotating them again would ask every
rotation N times. lmms-eval (tasks/mmbench) asks otherwise: f"{hint} {question} {options}", the
options after a line "There are several options:", then the same suffix.

Scored (`eval score --bench mmbench`) as MMBench's evaluator (opencompass tools/eval_mmbench.py,
the one for mmbench_dev_20230712.tsv; lmms-eval's MMBench_Evaluator has the same rules):
  a question is right only if every one of its rotations is: an answer read as a wrong letter
  fails it at once, and so does (here) one no rule reads;
  `can_infer_option`: the answer split on whitespace; if exactly one of A..E is a word, that
  letter, unless "A" is a word and there are more than 3 words ("A might be a quantifier");
  else the first of the forms X. X, X: X) X). (X) (X). :X :X, :X. :X) :X). that exactly one
  letter takes among the words;
  `can_infer_text`: else the one option whose text (lower-cased) is inside the lower-cased
  answer, if exactly one is.
MMBench's evaluator then asks ChatGPT to match an answer neither rule reads (3 tries, then a
seeded random letter); here there is no GPT fallback, such an answer is wrong, and the scores
say so (`note`, and `unread`: the answers no rule read and the questions they decided).
VLMEvalKit's can_infer today differs: it first turns . ( ) [ ] , : ; ! * # { } into spaces,
wants the letter among the last 4 words, skips the text match for answers over twice the
options' length, reads "answer is X", and maps refusals to "Z".

scores: `accuracy` over the questions (main rows), `subtasks` per category (MMBench's leaf
abilities) and `l2_categories` per l2-category, each {"n", "accuracy"}. Answers are matched to
rotations by "index:round_id" (round_id 0 when absent); a rotation with no answer is wrong.
`eval run` asks a question's rotations one after another, in the order the questions first
appear in the TSV.
"""

from __future__ import annotations

import base64
import binascii
import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tinylmm.errors import DataError
from tinylmm.eval.answering import Question
from tinylmm.eval.answers import layout_file, read_answers
from tinylmm.eval.base import BENCHMARKS
from tinylmm.eval.scienceqa import SINGLE_PRED_PROMPT

TSV = "mmbench_dev_20230712.tsv"
OPTIONS = ("A", "B", "C", "D")  # model_vqa_mmbench.py's all_options
LETTERS = "ABCDE"  # can_infer_option's choices (num_choice=5)
AFFIXES = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ").")) + tuple(
    (":", s) for s in ("", ",", ".", ")", ").")
)
PASS = 1_000_000  # index = question index + k * PASS for the k-th CircularEval pass
COLUMNS = ("index", "question", "hint", "A", "B", "answer", "category", "image")
# pandas' default NaN strings (read_table, as LLaVA's script reads the TSV), and LLaVA's is_none
NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A"}
NA |= {"NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
IMAGE_REFERENCE = 64  # VLMEvalKit: an image field this short is another row's index
NOTE = (
    "no GPT fallback: choices read by MMBench's rule-based can_infer only; "
    "MMBench's evaluator asks ChatGPT about answers it cannot read, here they are wrong"
)


@dataclass(frozen=True)
class Rotation:
    """One asking of a question: a TSV row, or a rotation of its options made for it."""

    index: int
    round_id: int
    prompt: str  # LLaVA's cur_prompt: hint, question and lettered options
    options: tuple[str, ...]  # shown as A, B, ...
    option_char: tuple[str, ...]  # the TSV letter of each shown option
    answer: str  # the letter the right option is shown under
    image: str  # base64, decoded only when asked (scoring needs no image)

    @property
    def key(self) -> str:
        return f"{self.index}:{self.round_id}"


@dataclass
class CircularQuestion:
    index: int  # the main row's
    category: str
    l2_category: str | None
    rotations: list[Rotation]


def _na(value: str | None) -> bool:
    return value is None or value in NA or value.lower() in ("nan", "none")


def read_tsv(path: Path) -> list[dict]:
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # base64 images are long fields
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        names = reader.fieldnames or []
        if "index" in names and "answer" not in names:
            raise DataError(f"{path} has no 'answer' column: only MMBench's dev split has its answers")
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise DataError(f"{path} has no column(s) {', '.join(missing)} (MMBench's TSV format)")
        return list(reader)


def _prompt(row: dict, options) -> str:
    text = row["question"] if _na(row["hint"]) else f"{row['hint']}\n{row['question']}"
    return text + "".join(f"\n{c}. {o}" for c, o in zip(OPTIONS, options))


def read_mmbench(data: Path) -> list[CircularQuestion]:
    """The questions of MMBench's TSV in `data`, each with its rotations (the module docstring)."""
    path = layout_file(Path(data), TSV, "MMBench's dev questions (a TSV with base64 images)")
    rows = read_tsv(path)
    by_index, parsed = {}, []
    for i, row in enumerate(rows, 1):
        try:
            index = int(row["index"])
        except (TypeError, ValueError):
            raise DataError(f"{path}, row {i}: index {row['index']!r} is not an integer") from None
        if index in by_index:
            raise DataError(f"{path}: index {index} appears twice")
        by_index[index] = row
        parsed.append((index, row))

    def image(index: int, row: dict) -> str:
        field = row["image"] or ""
        if len(field) <= IMAGE_REFERENCE:
            ref = by_index.get(int(field)) if field.strip().isdigit() else None
            if ref is None or len(ref["image"] or "") <= IMAGE_REFERENCE:
                raise DataError(f"{path}: question {index} has no image (its image field is {field!r})")
            field = ref["image"]
        return field

    groups: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    for index, row in parsed:
        groups[index % PASS].append((index, row))
    questions = {}
    for main, members in groups.items():
        if main not in by_index:
            raise DataError(f"{path}: row {members[0][0]} is a pass of question {main}, which is not in the file")
        row = by_index[main]
        l2 = row.get("l2-category")
        questions[main] = CircularQuestion(main, row["category"], None if _na(l2) else l2, [])
    for index, row in parsed:
        options = []
        for c in OPTIONS:
            if _na(row.get(c)):
                break
            options.append(row[c])
        letters = OPTIONS[: len(options)]
        if row["answer"] not in letters:
            raise DataError(f"{path}: question {index}'s answer {row['answer']!r} is not one of its options {letters}")
        encoded = image(index, row)
        question = questions[index % PASS]
        rounds = len(options) if len(groups[index % PASS]) == 1 else 1  # passes in the TSV: each row once
        for r in range(rounds):
            shown, chars = options[r:] + options[:r], letters[r:] + letters[:r]
            right = OPTIONS[chars.index(row["answer"])]
            rotation = Rotation(index, r, _prompt(row, shown), tuple(shown), chars, right, encoded)
            question.rotations.append(rotation)
    return list(questions.values())


def read_letter(answer: str) -> str | None:
    """MMBench's can_infer_option: the letter an answer names, None when it names none or several."""
    words = answer.split()
    bare = [c for c in LETTERS if c in words]
    if len(bare) == 1 and not ("A" in words and len(words) > 3):
        return bare[0]
    for before, after in AFFIXES:
        found = [c for c in LETTERS if before + c + after in words]
        if len(found) == 1:
            return found[0]
    return None


def read_choice(answer: str, rotation: Rotation) -> str | None:
    """MMBench's can_infer: the letter, else the one option whose text the answer holds."""
    letter = read_letter(answer)
    if letter is not None:
        return letter
    text = answer.lower()
    named = [c for c, option in zip(OPTIONS, rotation.options) if option.lower() in text]
    return named[0] if len(named) == 1 else None


def _answer_key(row: dict) -> str:
    return f"{row['question_id']}:{row.get('round_id', 0)}"


def _rates(hits: dict[int, bool], groups: dict[str, list[int]]) -> dict:
    return {
        name: {"n": len(ids), "accuracy": sum(hits[i] for i in ids) / len(ids)} for name, ids in sorted(groups.items())
    }


def score_mmbench(data: Path, answers_path: Path, rule: str = "llava") -> dict:
    questions = read_mmbench(data)
    answers = read_answers(answers_path, [r.key for q in questions for r in q.rotations], key=_answer_key)
    hits, unread_answers, unread_questions = {}, 0, 0
    for q in questions:
        texts = [answers.get(r.key) for r in q.rotations]
        read = [None if t is None else read_choice(t, r) for t, r in zip(texts, q.rotations)]
        unread = sum(t is not None and c is None for t, c in zip(texts, read))
        wrong = any(c is not None and c != r.answer for c, r in zip(read, q.rotations))
        unread_answers += unread
        # where MMBench's evaluator would have asked GPT: all answered, none read wrong, some unread
        unread_questions += bool(unread) and not wrong and None not in texts
        hits[q.index] = all(c == r.answer for c, r in zip(read, q.rotations))
    by_category, by_l2 = defaultdict(list), defaultdict(list)
    for q in questions:
        by_category[q.category].append(q.index)
        if q.l2_category is not None:
            by_l2[q.l2_category].append(q.index)
    n = len(questions)
    return {
        "bench": "mmbench",
        "rule": rule,
        "n": n,
        "metrics": {"accuracy": sum(hits.values()) / n if n else 0.0},
        "subtasks": _rates(hits, by_category),
        "l2_categories": _rates(hits, by_l2),
        "n_rotations": sum(len(q.rotations) for q in questions),
        "unread": {"answers": unread_answers, "questions": unread_questions},
        "note": f"{NOTE} ({unread_answers} answer(s) unread, deciding {unread_questions} question(s))",
        "missing": answers.report(),
    }


def mmbench_questions(data: Path) -> list[Question]:
    out, pictures = [], {}
    for q in read_mmbench(data):
        for r in q.rotations:
            if r.index not in pictures:
                try:
                    pictures[r.index] = base64.b64decode(r.image, validate=True)
                except binascii.Error as e:
                    raise DataError(f"{Path(data) / TSV}: question {r.index}'s image is not base64: {e}") from None
            fields = {"round_id": r.round_id, "options": list(r.options), "option_char": list(r.option_char)}
            text = f"{r.prompt}\n{SINGLE_PRED_PROMPT}"
            out.append(Question(r.index, None, text, recorded=r.prompt, picture=pictures[r.index], fields=fields))
    return out


@BENCHMARKS.register("mmbench")
class MMBenchBenchmark:
    """MMBench-dev, circular evaluation with MMBench's rule-based choice extraction (no GPT)."""

    rules = ("llava",)
    score = staticmethod(score_mmbench)
    questions = staticmethod(mmbench_questions)
    images = None  # base64 in the TSV
