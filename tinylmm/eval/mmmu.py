"""MMMU val, scored by MMMU's official mmmu/utils/eval_utils.py (MMMU-Benchmark/MMMU), as its
main_parse_and_eval.py runs it. LLaVA does not ship MMMU: LLaVA-1.5's MMMU figure comes from
MMMU's own mmmu/run_llava.py and this scorer.

Layout: the hub dataset MMMU/MMMU as downloaded for offline use
(`huggingface-cli download MMMU/MMMU --repo-type dataset --local-dir mmmu`), in mmmu/:
    <Subject>/validation-*.parquet    one folder per subject (Accounting ... Sociology, 30),
                                      columns id ("validation_<Subject>_<n>"), question,
                                      options (a Python list literal), answer, question_type
                                      ("multiple-choice" or "open"), image_1 ... image_7
Read with pyarrow (the `mmmu` extra: `pip install 'tinylmm[mmmu]'`), only the columns needed,
never the network. MMMU's answer_dict_val.json is not enough: it lacks the options, which the
parser needs. An answer's question_id is the MMMU id.

eval_utils.py's rule:
  multiple choice (parse_multi_choice_response; options lettered A, B, ... in order):
    strip each of , . ! ? ; : ' from both ends in turn, then pad with a space on each side;
    the candidates are the letters written "(X)"; if none, those written " X "; if none and
    the answer has more than 5 words, the letters whose option text it contains
    (case-insensitive); with several candidates the one written last wins (rfind); with none,
    a random letter (`random.choice`).
    Right when the letter is the answer.
  open (parse_open_response): the answer stripped, "." stripped, lower-cased and split into
    lines (its split on ". " before a capital runs after lower-casing, so only newlines split);
    from each line, its shortest tail after one of "could be ", "so ", "is ", "thus ",
    "therefore ", "final ", "answer ", "result " (and "=" on the last line), unless the tail
    is punctuation alone; none found: the whole answer. To those tails, the numbers in them
    (with thousands commas, scientific, plain). Each normalised: a number (float() after
    dropping commas) -> rounded to 2 decimals; else lower-cased, and a single character c
    becomes " c" and "c " (no trivial match).
    eval_open: right when a normalised number equals one of the normalised gold answers, or a
    normalised gold string is a substring of a normalised string prediction. The gold answer
    is a list where the dataset writes one ("['24/7', '3.429']": any of them).
  accuracy: instance level, right / questions, per subject and over all (calculate_ins_level_acc).
A question with no answer is scored wrong and listed under `missing`.

The random fallback is seeded: eval_utils.py calls `random.seed(42)` on import and draws from
Python's global generator, once per unparsable answer, in the order it parses them (the
subjects in data_utils.CAT_SHORT2LONG's order, the questions in the dataset's). Here a
`random.Random(42)` of its own is drawn in that same order, so a score does not depend on the
answer file's order or on anything else using `random`, and draws the letters MMMU's
main_parse_and_eval.py draws for all subjects (nothing else draws from its generator). 42
because it is MMMU's; another seed moves the accuracy by its guesses alone (a standard
deviation of sqrt(k * 1/4 * 3/4) / n for k unparsable four-option answers of n).

lmms-eval's rule (lmms_eval/tasks/mmmu/utils.py) differs and is not offered: its letter parse
also takes "X " without the leading space and "X." before the option text, its random
fallback is unseeded, it keeps only the first of the open-answer predictions, and it compares
the answer's string as written (a list stays its literal).

Answered by a model (`eval run --bench mmmu`), as MMMU's run_llava.py with its
configs/llava1.5.yaml asks: multiple choice "{question}\\n\\n(A) {option}\\n(B) ...\\n\\n\\nAnswer
with the option's letter from the given choices directly.", open "{question}\\n\\nAnswer the
question using a single word or phrase."; the question's first image (image_1), written once to
images/<id>.png in the benchmark folder (the parquet files hold the bytes). A question
whose options are images (more than one <img='...'> in them) is asked without an image: run_llava
answers those with a random letter and no model.
"""

from __future__ import annotations

import ast
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tinylmm.errors import ConfigError, DataError
from tinylmm.eval.answering import Question
from tinylmm.eval.answers import read_answers
from tinylmm.eval.base import BENCHMARKS

SEED = 42  # eval_utils.py's random.seed(42)
SPLIT = "validation"
IMAGES = "images"
# data_utils.CAT_SHORT2LONG's values, in its order: the order MMMU draws its random fallbacks in
SUBJECTS = (
    "Accounting Agriculture Architecture_and_Engineering Art Art_Theory Basic_Medical_Science Biology "
    "Chemistry Clinical_Medicine Computer_Science Design Diagnostics_and_Laboratory_Medicine Economics "
    "Electronics Energy_and_Power Finance Geography History Literature Manage Marketing Materials Math "
    "Mechanical_Engineering Music Pharmacy Physics Psychology Public_Health Sociology"
).split()
MC_PROMPT = "{}\n\n{}\n\nAnswer with the option's letter from the given choices directly."
OPEN_PROMPT = "{}\n\nAnswer the question using a single word or phrase."
KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
TRIVIAL = (":", ",", ".", "!", "?", ";", "'")


# ---------------------------------------------------------------- multiple choice


def letters(options: list[str]) -> dict[str, str]:
    """data_utils.get_multi_choice_info: {"A": first option, "B": second, ...}."""
    return {chr(ord("A") + i): option for i, option in enumerate(options)}


def parse_multi_choice(response: str, index2ans: dict[str, str], rng: random.Random) -> str:
    """eval_utils.parse_multi_choice_response (module docstring); `rng` draws the fallback."""
    choices = list(index2ans)
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = f" {response} "
    by_letter, bracketed = True, False
    candidates = [c for c in choices if f"({c})" in response]
    if candidates:
        bracketed = True
    else:
        candidates = [c for c in choices if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, ans in index2ans.items() if ans.lower() in response.lower()]
        by_letter = not candidates
    if not candidates:
        return rng.choice(choices)
    if len(candidates) == 1:
        return candidates[0]
    if not by_letter:
        where = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    elif bracketed:
        where = [response.rfind(f"({c})") for c in candidates]
    else:
        where = [response.rfind(f" {c} ") for c in candidates]
    return candidates[where.index(max(where))]  # np.argmax: the first of equal maxima


# ---------------------------------------------------------------- open answers

_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_SENTENCES = re.compile(r"\.\s(?=[A-Z])|\n")


def is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize(text: str) -> list:
    """eval_utils.normalize_str: a number rounded to 2 decimals, else the lower-cased string
    (a single character c as " c" and "c ")."""
    text = text.strip()
    if is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def extract_numbers(text: str) -> list[str]:
    """eval_utils.extract_numbers: with thousands commas, then scientific, then plain."""
    return _COMMAS.findall(text) + _SCIENTIFIC.findall(text) + _SIMPLE.findall(text)


def key_responses(response: str) -> list[str]:
    """eval_utils.parse_open_response's get_key_subresponses (module docstring)."""
    response = response.strip().strip(".").lower()
    lines = _SENTENCES.split(response)
    found = []
    for i, line in enumerate(lines):
        indicators = KEY_INDICATORS + (("=",) if i == len(lines) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in TRIVIAL:
            found.append(shortest)
    return found or [response]


def parse_open(response: str) -> list:
    """eval_utils.parse_open_response: the normalised candidate answers (a set, as a list)."""
    keys = key_responses(response)
    candidates = keys + [n for k in keys for n in extract_numbers(k)]
    return list({v for c in candidates for v in normalize(c)})


def eval_open(gold, predictions: list) -> bool:
    """eval_utils.eval_open: a number equal to a gold one, or a gold string inside a predicted one."""
    golds = [v for g in (gold if isinstance(gold, list) else [gold]) for v in normalize(str(g))]
    for pred in predictions:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


# ---------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Problem:
    id: str
    subject: str
    question_type: str
    options: list[str]
    answer: object  # a letter, a string, or a list of strings (any of them)


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "reading MMMU's parquet files needs pyarrow: pip install 'tinylmm[mmmu]' (or pip install pyarrow)"
        ) from None
    return pq


def _options(text, path: Path, qid: str) -> list[str]:
    try:
        options = ast.literal_eval(text)  # data_utils.construct_prompt: eval(sample['options'])
    except (ValueError, SyntaxError):
        options = None
    if not isinstance(options, list):
        raise DataError(f"{path}: the options of {qid} are not a Python list literal: {text!r}")
    return [str(o) for o in options]


def _gold(answer: str):
    """The answer, or the list of answers the dataset writes as a list literal."""
    if answer.startswith("["):
        try:
            listed = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return answer
        if isinstance(listed, list):
            return [str(a) for a in listed]
    return answer


def subject_files(data: Path, subject: str) -> list[Path]:
    folder = Path(data) / subject
    files = sorted(folder.glob(f"{SPLIT}-*.parquet"))
    if not files:
        raise DataError(
            f"missing {folder / f'{SPLIT}-*.parquet'}: expected MMMU's {subject} validation split "
            f"('{subject}/{SPLIT}-*.parquet' in the benchmark folder {data}, the hub dataset MMMU/MMMU as downloaded)"
        )
    return files


def read_table(path: Path, columns: list[str]) -> list[dict]:
    pq = _pyarrow()
    try:
        table = pq.read_table(path, columns=columns)
    except Exception as e:  # pyarrow's errors: a missing column, a file that is not parquet
        raise DataError(f"{path}: cannot read the columns {', '.join(columns)} of MMMU's format: {e}") from None
    return table.to_pylist()


def read_problems(data: Path, extra: tuple[str, ...] = ()) -> list[tuple[Problem, dict]]:
    """The validation problems of the 30 subjects in MMMU's order, each with its row (which
    holds the `extra` columns too)."""
    columns = ["id", "question_type", "options", "answer", *extra]
    problems = []
    for subject in SUBJECTS:
        for path in subject_files(data, subject):
            for row in read_table(path, columns):
                qid = str(row["id"])
                options = _options(row["options"], path, qid)
                problem = Problem(qid, subject, str(row["question_type"]), options, _gold(str(row["answer"])))
                problems.append((problem, row | {"path": path}))
    return problems


def score_mmmu(data: Path, answers_path: Path, rule: str = "mmmu") -> dict:
    problems = [p for p, _ in read_problems(Path(data))]
    answers = read_answers(answers_path, [p.id for p in problems])
    rng = random.Random(SEED)
    right: dict[str, list[bool]] = {s: [] for s in SUBJECTS}
    for p in problems:
        text = answers.get(p.id)
        if text is None:
            ok = False
        elif p.question_type == "multiple-choice":
            ok = parse_multi_choice(text, letters(p.options), rng) == p.answer
        else:
            ok = eval_open(p.answer, parse_open(text))
        right[p.subject].append(ok)
    subjects = {s: {"n": len(r), "accuracy": sum(r) / len(r) if r else 0.0} for s, r in right.items()}
    n = len(problems)
    return {
        "bench": "mmmu",
        "rule": rule,
        "n": n,
        "metrics": {"accuracy": sum(sum(r) for r in right.values()) / n if n else 0.0},
        "subjects": subjects,
        "seed": SEED,
        "missing": answers.report(),
    }


# ---------------------------------------------------------------- answering


def prompt_of(p: Problem, question: str) -> str:
    """MMMU's construct_prompt with configs/llava1.5.yaml."""
    if p.question_type == "multiple-choice":
        listed = "".join(f"({c}) {option}\n" for c, option in letters(p.options).items())
        return MC_PROMPT.format(question, listed)
    return OPEN_PROMPT.format(question)


def mmmu_questions(data: Path) -> list[Question]:
    """The validation questions; each one's image_1 is written to images/<id>.png once."""
    data = Path(data)
    (data / IMAGES).mkdir(exist_ok=True)
    questions = []
    for p, row in read_problems(data, extra=("question", "image_1")):
        image_options = sum(len(re.findall(r"<img='(.*?)'>", o)) for o in p.options)
        image = _write_image(data / IMAGES / f"{p.id}.png", row) if image_options <= 1 else None
        questions.append(Question(p.id, image, prompt_of(p, str(row["question"] or ""))))
    return questions


def _write_image(out: Path, row: dict) -> str | None:
    """The row's image_1 written to `out` (kept when there already); None when it has none."""
    if out.is_file():
        return out.name
    image = row.get("image_1")
    if not image or not image.get("bytes"):
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image["bytes"])) as im:
            im.save(out)
    except OSError as e:
        raise DataError(f"{row['path']}: the image_1 of {row['id']} cannot be read: {e}") from None
    return out.name


@BENCHMARKS.register("mmmu")
class MMMUBenchmark:
    """MMMU val, 30 subjects, MMMU's official parse (seeded fallback), from the hub dataset's parquet files."""

    rules = ("mmmu",)
    score = staticmethod(score_mmmu)
    questions = staticmethod(mmmu_questions)
    images = IMAGES
