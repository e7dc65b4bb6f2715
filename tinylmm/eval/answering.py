"""Answering a benchmark's question file with a model, into an answer file in LLaVA's format.

As LLaVA-1.5's `llava/eval/model_vqa_loader.py` does (scripts/v1_5/eval/{pope,gqa,textvqa}.sh):
each line of the question file is `{"question_id", "image", "text", ...}`; the prompt is
`DEFAULT_IMAGE_TOKEN + '\\n' + line["text"]` in the model's own conversation template, the
image `Image.open(os.path.join(image_folder, line["image"])).convert('RGB')`, greedy decoding
(`--temperature 0`, `max_new_tokens` 128); and each answer is written as
    {"question_id", "prompt": line["text"], "text": outputs, "answer_id": shortuuid.uuid(),
     "model_id": model_name, "metadata": {}}
one JSON line per question, flushed as it goes.

Beyond LLaVA's script: the file is appended to, and a question already answered in it (the
same question id and prompt: TextVQA's question ids are image ids, shared by the questions of
one image) is skipped, so an interrupted run resumes; a last line cut short by the interruption
is dropped and its question asked again. A question whose image is missing is
not answered and is reported by id (its answer is then missing, scored wrong by `eval score`).

A question file may carry its images (MMBench's TSV, base64): such a question holds the encoded
image (`picture`) instead of a path. A benchmark whose LLaVA script writes more fields into
each answer (model_vqa_mmbench.py: round_id, options, option_char) gives them as `fields`; a
`round_id` there is part of what makes an answer already given (one prompt, several rounds).
An image file that cannot be read is an error naming the question and the file; the batches
before it are in the answer file already, so the run resumes once the file is mended.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tinylmm.data.jsonl import read_jsonl
from tinylmm.data.templates.core import IMAGE_TOKEN
from tinylmm.errors import DataError
from tinylmm.eval.answers import layout_file
from tinylmm.models.generation import generate_batch


@dataclass(frozen=True)
class Question:
    question_id: int | str
    image: str | None  # relative to the image folder; None for a text-only question
    text: str  # what the model is asked, after the image token when there is an image
    recorded: str | None = None  # the answer's `prompt` when not `text` (ScienceQA's has "<image>\n")
    picture: bytes | None = field(default=None, repr=False)  # the encoded image, where the file carries it
    fields: dict = field(default_factory=dict, compare=False, hash=False)  # more answer fields (round_id, ...)

    @property
    def prompt(self) -> str:
        return self.text if self.recorded is None else self.recorded

    @property
    def key(self) -> tuple[str, str, str]:
        return str(self.question_id), self.prompt, str(self.fields.get("round_id", ""))


def read_question_jsonl(data: Path, rel: str, what: str) -> list[Question]:
    """LLaVA's question file `data/rel`: JSON lines with question_id, text and (optionally) image."""
    path = layout_file(Path(data), rel, what)
    questions = []
    for i, row in enumerate(read_jsonl(path), 1):
        for name in ("question_id", "text"):
            if name not in row:
                raise DataError(f"{path}, line {i}: a question has '{name}' (LLaVA's question file format)")
        questions.append(Question(row["question_id"], row.get("image"), str(row["text"])))
    return questions


@dataclass
class AnswerReport:
    """What one `eval run` into an answer file did."""

    answers: Path
    total: int  # questions asked for (after --limit)
    answered: int = 0  # answered now
    skipped: int = 0  # already in the answer file
    missing_images: list[str] = field(default_factory=list)  # ids of questions whose image is missing

    def as_dict(self) -> dict:
        return {
            "answers": str(self.answers),
            "total": self.total,
            "answered": self.answered,
            "skipped": self.skipped,
            "missing_images": self.missing_images,
        }


def mend_last_line(path: Path) -> None:
    """An answer file ends with a newline before more is appended: a last line cut short (the
    run was killed mid-write) is dropped, to be answered again; a whole one gets its newline."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
        whole = True
    except ValueError:
        whole = False
    with path.open("r+b") as f:
        if whole:
            f.seek(0, 2)
            f.write(b"\n")
        else:
            f.truncate(start)


def answered_keys(path: Path) -> set[tuple[str, str, str]]:
    """The (question id, prompt, round id) of each answer already in `path` (none when it does not exist)."""
    if not path.exists():
        return set()
    mend_last_line(path)
    rows = read_jsonl(path)
    for i, row in enumerate(rows, 1):
        if "question_id" not in row:
            raise DataError(f"{path}: answer {i} has no 'question_id'; not an answer file to resume")
    return {(str(r["question_id"]), str(r.get("prompt", "")), str(r.get("round_id", ""))) for r in rows}


def answer_questions(
    model,
    processor,
    questions: Sequence[Question],
    images: Path,
    answers: Path,
    *,
    model_id: str,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    on_batch=None,
) -> AnswerReport:
    """Answer `questions` (images under `images`) into the answer file `answers`, appending;
    those already answered there are skipped. `on_batch(done, todo)` after each batch."""
    answers, images = Path(answers), Path(images)
    done = answered_keys(answers)
    report = AnswerReport(answers, total=len(questions))
    todo = []
    for q in questions:
        if q.key in done:
            report.skipped += 1
        elif q.image is not None and not (images / q.image).is_file():
            report.missing_images.append(str(q.question_id))
        else:
            todo.append(q)
    answers.parent.mkdir(parents=True, exist_ok=True)
    with answers.open("a") as f:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            convs, pictures = [], []
            for q in chunk:
                if q.image is None and q.picture is None:
                    convs.append([("human", q.text)])
                    pictures.append([])
                    continue
                convs.append([("human", f"{IMAGE_TOKEN}\n{q.text}")])
                source = images / q.image if q.picture is None else io.BytesIO(q.picture)
                try:
                    with Image.open(source) as im:
                        pictures.append([im.convert("RGB")])
                except OSError as e:  # PIL's UnidentifiedImageError is one: a file that is no image
                    where = images / q.image if q.picture is None else "its image in the question file"
                    raise DataError(f"question {q.question_id}: {where} is not a readable image ({e})") from None
            texts = generate_batch(model, processor, convs, pictures, max_new_tokens=max_new_tokens)
            for q, text in zip(chunk, texts):
                row = {
                    "question_id": q.question_id,
                    **q.fields,
                    "prompt": q.prompt,
                    "text": text,
                    "answer_id": uuid.uuid4().hex,
                    "model_id": model_id,
                    "metadata": {},
                }
                f.write(json.dumps(row) + "\n")
            f.flush()  # an interrupted run keeps every finished batch
            report.answered += len(chunk)
            if on_batch is not None:
                on_batch(report.answered, len(todo))
    return report
