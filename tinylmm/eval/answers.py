"""Answer files in LLaVA's answer format, and the layout files a benchmark scores them against.

An answer file is JSON lines, one answer each, as LLaVA's `llava/eval/model_vqa*.py` write
them: `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}`. Scoring needs
only `question_id` and `text`; the rest is kept as written. Question ids are compared as
strings (POPE's are ints, ScienceQA's and GQA's strings).

The ids are checked against the benchmark's questions before anything is scored: an unknown
or duplicated id is an error naming how many and which; a question with no answer is scored
as wrong and listed in the scores under `missing` (never dropped, which would raise the score).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tinylmm.data.jsonl import read_jsonl
from tinylmm.errors import DataError

SHOWN_IDS = 10  # ids quoted in a message; the count says how many there are in all


def layout_file(data: Path, rel: str, what: str) -> Path:
    """`data/rel`, which must exist: else an error naming the path and the layout's file."""
    path = Path(data) / rel
    if not path.is_file():
        raise DataError(f"missing {path}: expected {what} ('{rel}' in the benchmark folder {data})")
    return path


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not JSON: {e}") from None


def with_keys(path: Path, where: str, row, keys: Iterable[str]) -> dict:
    """`row`, an entry of the layout file `path` (`where` names it: "question 7"), which must be a
    JSON object holding `keys`: else an error naming the file, the entry and the key."""
    if not isinstance(row, dict):
        raise DataError(f"{path}: {where} is not a JSON object")
    for key in keys:
        if key not in row:
            raise DataError(f"{path}: {where} has no '{key}'")
    return row


def _ids(ids: Iterable[str]) -> str:
    ids = list(ids)
    shown = ", ".join(ids[:SHOWN_IDS])
    return shown + (f", ... ({len(ids) - SHOWN_IDS} more)" if len(ids) > SHOWN_IDS else "")


@dataclass
class Answers:
    """The answers of one file, by question id (str), checked against the expected ids."""

    path: Path
    text: dict[str, str]
    missing: list[str] = field(default_factory=list)

    def get(self, qid) -> str | None:
        """The answer's text, None when the question has no answer."""
        return self.text.get(str(qid))

    def report(self) -> dict:
        return {"n": len(self.missing), "ids": self.missing}


def accuracy_scores(bench: str, rule: str, n: int, right: float, answers: Answers) -> dict:
    """scores.json for a benchmark whose one metric is accuracy over `n` questions."""
    return {
        "bench": bench,
        "rule": rule,
        "n": n,
        "metrics": {"accuracy": right / n if n else 0.0},
        "missing": answers.report(),
    }


def question_id(row: dict) -> str:
    return str(row["question_id"])


def read_answers(path: Path, expected: Iterable, key: Callable[[dict], str] = question_id) -> Answers:
    """The answer file at `path`, checked against the `expected` question ids. `key` makes a
    row's id where the question id alone is not one (TextVQA's: image id and question)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing {path}: expected the answer file (JSON lines in LLaVA's answer format)")
    rows = read_jsonl(path)
    for i, row in enumerate(rows, 1):
        for name in ("question_id", "text"):
            if name not in row:
                raise DataError(f"{path}: answer {i} has no '{name}' (LLaVA's answer format has question_id and text)")
    keys = [key(r) for r in rows]
    counts = Counter(keys)
    expected = [str(q) for q in expected]
    known = set(expected)
    duplicated = [q for q, n in counts.items() if n > 1]
    unknown = [q for q in counts if q not in known]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown question id(s) (not in the benchmark's questions): {_ids(unknown)}")
    if duplicated:
        problems.append(f"{len(duplicated)} question id(s) answered more than once: {_ids(duplicated)}")
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems))
    text = {k: str(r["text"]) for k, r in zip(keys, rows)}
    return Answers(path, text, missing=[q for q in expected if q not in text])
