"""MMBench-dev and VQAv2 val: fixture files written here in the official formats (MMBench's TSV
with base64 PNGs, VQAv2's question and annotation JSON), scored to hand-computed values; the
circular evaluation's and the choice extraction's edge cases; VQA's answer processing; and
`eval run` answering every rotation of a tiny TSV with a tiny model."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image
from rich.console import Console

from tinylmm.api import answer_benchmark, build, score_answers
from tinylmm.cli.evaluate import scores_table
from tinylmm.data.jsonl import read_jsonl
from tinylmm.data.templates.core import IMAGE_TOKEN
from tinylmm.errors import ConfigError, DataError
from tinylmm.eval import answering
from tinylmm.eval.mmbench import TSV, mmbench_questions, read_letter
from tinylmm.eval.textvqa import normalize
from tinylmm.eval.vqa_accuracy import EVALAI_COMMA, VQA_COMMA, process_digit_article, process_punctuation
from tinylmm.eval.vqav2 import lmms_eval_accuracy, official_accuracy, vqav2_questions
from tinylmm.models.generation import generate_batch

from conftest import TINY

SUFFIX = "Answer with the option's letter from the given choices directly."


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def png(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------- MMBench

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category"]
COARSE, FINE = "coarse_perception", "fine-grained_perception (instance-level)"
# (index, question, hint, options, answer, category, image, l2-category); NaN is written "" as pandas writes it
MMBENCH = [
    # question 0: 3 options, its CircularEval passes in the TSV (index + k * 1e6)
    (0, "Which animal?", "Look.\nClosely.", ["cat", "dog", "bird"], "B", "image_scene", png("red"), COARSE),
    (1000000, "Which animal?", "Look.\nClosely.", ["dog", "bird", "cat"], "A", "image_scene", png("red"), COARSE),
    (2000000, "Which animal?", "Look.\nClosely.", ["bird", "cat", "dog"], "C", "image_scene", png("red"), COARSE),
    # question 1: 2 options, passes in the TSV
    (1, "Is it day?", "", ["yes", "no"], "A", "ocr", png("blue"), COARSE),
    (1000001, "Is it day?", "", ["no", "yes"], "B", "ocr", png("blue"), COARSE),
    # question 2: 4 options, main row only: asked in 4 rotations
    (2, "What color?", "nan", ["red", "green", "blue", "black"], "C", "ocr", png("green"), FINE),
    # question 3: 2 options, main row only, its image another row's (VLMEvalKit keeps one copy)
    (3, "Which side?", "", ["left", "right"], "B", "ocr", "0", FINE),
]
MMBENCH_ANSWERS = {  # "index:round_id": text
    "0:0": "B",
    "1000000:0": "dog",  # the option's text: A, right
    "2000000:0": "C.",
    "1:0": "A",
    "1000001:0": "A",  # wrong in one pass: question 1 is wrong
    "2:0": "C",  # rotation 0 shows red, green, blue, black: C
    "2:1": "(B)",  # rotation 1 shows green, blue, black, red: blue is B
    "2:2": "The answer is blue",  # no letter; the text of A (blue, black, red, green)
    "2:3": "D",
    "3:0": "A or B",  # two letters, no text: unread, so question 3 is wrong
    "3:1": "A",  # rotation 1 shows right, left
}


def mmbench_dir(tmp_path, rows=MMBENCH, columns=COLUMNS):
    root = tmp_path / "mmbench"
    root.mkdir(parents=True, exist_ok=True)
    with (root / TSV).open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")  # quotes the hint's newline, as pandas' to_csv does
        writer.writerow(columns)
        for index, question, hint, options, answer, category, image, l2 in rows:
            cells = dict(zip(["A", "B", "C", "D"], options))
            row = {"index": index, "question": question, "hint": hint, "answer": answer, "category": category}
            row |= {"image": image, "source": "test", "l2-category": l2, **cells}
            writer.writerow([row.get(c, "") for c in columns])
    return root


def mmbench_answers(path, answers=MMBENCH_ANSWERS, extra=()):
    rows = []
    for key, text in [*answers.items(), *extra]:
        index, round_id = key.split(":")
        rows.append({"question_id": int(index), "round_id": int(round_id), "prompt": "q", "text": text})
    return write_jsonl(path, rows)


def test_mmbench_circular_accuracy_per_category(tmp_path):
    data = mmbench_dir(tmp_path)
    scores, _ = score_answers("mmbench", data, mmbench_answers(tmp_path / "a.jsonl"))
    assert (scores["bench"], scores["rule"], scores["n"], scores["n_rotations"]) == ("mmbench", "llava", 4, 11)
    assert scores["metrics"] == {"accuracy": 0.5}  # questions 0 and 2 right in every rotation
    assert scores["subtasks"] == {"image_scene": {"n": 1, "accuracy": 1.0}, "ocr": {"n": 3, "accuracy": 1 / 3}}
    assert scores["l2_categories"] == {COARSE: {"n": 2, "accuracy": 0.5}, FINE: {"n": 2, "accuracy": 0.5}}
    assert scores["unread"] == {"answers": 1, "questions": 1}  # "A or B", which GPT would have decided
    assert "no GPT fallback" in scores["note"] and scores["missing"] == {"n": 0, "ids": []}


def test_mmbench_one_wrong_or_missing_rotation_fails_the_question(tmp_path):
    data = mmbench_dir(tmp_path)
    wrong = {**MMBENCH_ANSWERS, "2:3": "C"}  # question 2's last rotation now wrong
    scores, _ = score_answers("mmbench", data, mmbench_answers(tmp_path / "a.jsonl", wrong))
    assert scores["metrics"]["accuracy"] == 0.25 and scores["subtasks"]["ocr"]["accuracy"] == 0.0
    gone = {k: v for k, v in MMBENCH_ANSWERS.items() if k != "2:3"}
    scores, _ = score_answers("mmbench", data, mmbench_answers(tmp_path / "b.jsonl", gone))
    assert scores["metrics"]["accuracy"] == 0.25 and scores["missing"] == {"n": 1, "ids": ["2:3"]}


def test_mmbench_unknown_and_duplicate_answers_are_named(tmp_path):
    data = mmbench_dir(tmp_path)
    answers = mmbench_answers(tmp_path / "a.jsonl", extra=[("0:0", "B"), ("0:1", "A")])
    with pytest.raises(DataError, match=r"1 unknown question id\(s\).*: 0:1; 1 question id\(s\) answered more.*: 0:0"):
        score_answers("mmbench", data, answers)


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("B. dog", "B"),  # "X." among the words
        ("(C)", "C"),
        ("Answer: D", "D"),
        ("A cat", "A"),  # at most 3 words: "A" is the letter
        ("A cat is here", None),  # "A might be a quantifier"
        ("A or B", None),  # two letters
        ("It is E", "E"),  # A..E are read whatever the question's options
        ("none of them", None),
    ],
)
def test_mmbench_letter_rule(text, letter):
    assert read_letter(text) == letter


def test_mmbench_option_text_must_name_one_option(tmp_path):
    data = mmbench_dir(tmp_path)
    first = {"0:0": "a dog", "1000000:0": "a dog", "2000000:0": "the dog"}  # question 0 by its option's text
    scores, _ = score_answers("mmbench", data, mmbench_answers(tmp_path / "a.jsonl", {**MMBENCH_ANSWERS, **first}))
    assert scores["subtasks"]["image_scene"]["accuracy"] == 1.0
    both = {**MMBENCH_ANSWERS, "0:0": "a dog or a cat"}  # two options' texts: unread
    scores, _ = score_answers("mmbench", data, mmbench_answers(tmp_path / "b.jsonl", both))
    assert scores["subtasks"]["image_scene"]["accuracy"] == 0.0 and scores["unread"] == {"answers": 2, "questions": 2}


def test_mmbench_questions_as_llava_asks_them(tmp_path):
    questions = mmbench_questions(mmbench_dir(tmp_path))
    keys = [(q.question_id, q.fields["round_id"]) for q in questions]
    assert keys == [(0, 0), (1000000, 0), (2000000, 0), (1, 0), (1000001, 0)] + [(2, r) for r in range(4)] + [
        (3, 0),
        (3, 1),
    ]
    first = questions[0]
    assert first.prompt == "Look.\nClosely.\nWhich animal?\nA. cat\nB. dog\nC. bird"
    assert first.text == f"{first.prompt}\n{SUFFIX}" and first.image is None
    rotated = questions[6]  # question 2, round 1
    assert rotated.prompt == "What color?\nA. green\nB. blue\nC. black\nD. red"  # hint "nan" left out
    assert rotated.fields == {"round_id": 1, "options": ["green", "blue", "black", "red"], "option_char": list("BCDA")}
    with Image.open(io.BytesIO(first.picture)) as im:
        assert im.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert questions[-1].picture == first.picture  # the image named by index


def test_mmbench_bad_layout_and_rows_are_named(tmp_path):
    answers = mmbench_answers(tmp_path / "a.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"empty/{TSV}: expected MMBench's dev questions"):
        score_answers("mmbench", tmp_path / "empty", answers)
    bad = [*MMBENCH[:5], (2, "What color?", "", ["red", "green"], "C", "ocr", png("green"), FINE)]
    with pytest.raises(DataError, match=r"question 2's answer 'C' is not one of its options \('A', 'B'\)"):
        mmbench_questions(mmbench_dir(tmp_path / "x", bad))
    with pytest.raises(DataError, match="row 1000005 is a pass of question 5, which is not in the file"):
        mmbench_questions(mmbench_dir(tmp_path / "y", [*MMBENCH, (1000005, "q", "", ["a", "b"], "A", "c", "0", FINE)]))
    garbled = [*MMBENCH[:5], (2, "What color?", "", ["red", "green"], "A", "ocr", "@" * 80, FINE)]
    with pytest.raises(DataError, match="question 2's image is not base64"):
        mmbench_questions(mmbench_dir(tmp_path / "w", garbled))
    with pytest.raises(DataError, match="question 2 has no image"):
        mmbench_questions(mmbench_dir(tmp_path / "v", [*MMBENCH[:5], (2, "Q?", "", ["a", "b"], "A", "o", "", FINE)]))
    with pytest.raises(DataError, match="no 'answer' column: only MMBench's dev split"):
        mmbench_questions(mmbench_dir(tmp_path / "z", columns=[c for c in COLUMNS if c != "answer"]))


def test_scores_table_shows_the_note_and_the_groups(tmp_path):
    scores, _ = score_answers("mmbench", mmbench_dir(tmp_path), mmbench_answers(tmp_path / "a.jsonl"))
    console = Console(record=True, width=200)
    console.print(scores_table(scores))
    text = console.export_text()
    assert "no GPT fallback" in text and COARSE in text and "image_scene" in text and "overall" in text


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmbench-run")
    model, processor = build("toy", [o for o in TINY if o.startswith("model.")])
    model.save(root / "run" / "final", processor)
    return root / "run" / "final"


def test_eval_run_answers_every_rotation(tiny_checkpoint, tmp_path, monkeypatch):
    data = mmbench_dir(tmp_path)
    answers = tmp_path / "eval" / "mmbench-answers.jsonl"
    asked = []

    def recording(model, processor, convs, pictures, **kw):  # the real generation, its inputs kept
        asked.extend(zip(convs, pictures))
        return generate_batch(model, processor, convs, pictures, **kw)

    monkeypatch.setattr(answering, "generate_batch", recording)
    report = answer_benchmark(tiny_checkpoint, "mmbench", data, answers=answers, batch_size=4, max_new_tokens=2)
    assert (report.total, report.answered, report.missing_images) == (11, 11, [])
    # each asked with its TSV image, decoded in memory: question 0 red, question 3 too (by reference)
    assert [pics[0].getpixel((0, 0)) for _, pics in asked] == [(255, 0, 0)] * 3 + [(0, 0, 255)] * 2 + [
        (0, 128, 0)
    ] * 4 + [(255, 0, 0)] * 2
    assert all(conv[0][1].startswith(f"{IMAGE_TOKEN}\n") and conv[0][1].endswith(SUFFIX) for conv, _ in asked)
    rows = read_jsonl(answers)
    assert sorted(f"{r['question_id']}:{r['round_id']}" for r in rows) == sorted(MMBENCH_ANSWERS)
    by_key = {(r["question_id"], r["round_id"]): r for r in rows}
    assert by_key[(2, 1)]["option_char"] == list("BCDA")
    assert by_key[(2, 1)]["prompt"].startswith("What color?\nA. green")
    scores, _ = score_answers("mmbench", data, answers)
    assert scores["n"] == 4 and scores["missing"]["n"] == 0
    again = answer_benchmark(tiny_checkpoint, "mmbench", data, answers=answers, max_new_tokens=2)
    assert (again.answered, again.skipped) == (0, 11)  # rounds told apart when resuming
    twins = mmbench_dir(tmp_path / "twins", [(5, "Same?", "", ["same", "same"], "A", "ocr", png("red"), FINE)])
    first = answer_benchmark(tiny_checkpoint, "mmbench", twins, answers=tmp_path / "t.jsonl", limit=1, max_new_tokens=2)
    rest = answer_benchmark(tiny_checkpoint, "mmbench", twins, answers=tmp_path / "t.jsonl", max_new_tokens=2)
    assert (first.answered, rest.answered, rest.skipped) == (1, 1, 1)  # one prompt, two rounds: both asked
    with pytest.raises(ConfigError, match="--images: the mmbench question file carries its images"):
        answer_benchmark(tiny_checkpoint, "mmbench", data, images=tmp_path, answers=answers)


# ---------------------------------------------------------------- VQAv2

VQAV2 = [  # (question_id, image_id, answer_type, 10 human answers)
    (101, 42, "yes/no", ["yes"] * 10),
    (102, 42, "number", ["2"] * 3 + ["3"] * 7),
    (103, 43, "other", ["man's hat"] * 4 + ["hat"] * 6),
    (104, 43, "other", ["t-shirt"] * 5 + ["shirt"] * 5),
    (105, 44, "other", ["t-shirt"] * 10),  # all the same: vqaEval.py leaves them unprocessed
    (106, 44, "number", ["1"] * 10),
]
VQAV2_ANSWERS = {101: "Yes.", 102: "two", 103: "Man's hat", 104: "T-shirt", 105: "t-shirt"}  # 106 unanswered


def vqav2_dir(tmp_path):
    root = tmp_path / "vqav2"
    root.mkdir()
    questions = [{"question_id": q, "image_id": img, "question": f"Question {q}?"} for q, img, _, _ in VQAV2]
    annotations = [
        {
            "question_id": q,
            "image_id": img,
            "question_type": "what",
            "answer_type": kind,
            "multiple_choice_answer": humans[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate(humans, 1)],
        }
        for q, img, kind, humans in VQAV2
    ]
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return root


def vqav2_answers(path, answers=VQAV2_ANSWERS):
    return write_jsonl(path, [{"question_id": q, "prompt": "q", "text": t} for q, t in answers.items()])


def test_vqav2_accuracy_per_answer_type_under_each_rule(tmp_path):
    data, answers = vqav2_dir(tmp_path), vqav2_answers(tmp_path / "a.jsonl")
    scores, _ = score_answers("vqav2", data, answers)
    # llava: 101 1, 102 (3 * 2/3 + 7) / 10 = 0.9, 103 0 ("man 's hat"), 104 1, 105 0 (unprocessed "t-shirt"), 106 0
    assert scores["rule"] == "llava" and scores["n"] == 6
    assert scores["metrics"]["accuracy"] == pytest.approx(2.9 / 6)
    assert scores["answer_types"] == {
        "number": {"n": 2, "accuracy": pytest.approx(0.45)},
        "other": {"n": 3, "accuracy": pytest.approx(1 / 3)},
        "yes/no": {"n": 1, "accuracy": 1.0},
    }
    assert scores["missing"] == {"n": 1, "ids": ["106"]}
    scores, _ = score_answers("vqav2", data, answers, rule="lmms-eval")  # 103 and 105 match there
    assert scores["metrics"]["accuracy"] == pytest.approx(4.9 / 6) and scores["answer_types"]["other"]["accuracy"] == 1


@pytest.mark.parametrize(
    "text, comma, processed",
    [
        ("1,000", VQA_COMMA, "1000"),  # a comma between digits: punctuation deleted, not spaced
        ("1,,000", VQA_COMMA, "1 000"),  # vqaEval.py wants one comma ...
        ("1,,000", EVALAI_COMMA, "1000"),  # ... EvalAI's one or more
        ("U.S.A.", VQA_COMMA, "usa"),
        ("3.5 dogs", VQA_COMMA, "3.5 dogs"),
        ("t-shirt", VQA_COMMA, "t shirt"),
        ("t - shirt", VQA_COMMA, "t shirt"),
        ("The Two Dogs!", VQA_COMMA, "2 dogs"),
        ("dont know", VQA_COMMA, "don't know"),
        ("man's", VQA_COMMA, "man's"),  # no "'s" split: that is EvalAI's word_tokenize
    ],
)
def test_vqa_answer_processing(text, comma, processed):
    assert process_digit_article(process_punctuation(text, comma)) == processed


def test_vqa_rules_differ_where_the_sources_do():
    assert normalize("Man's") == "man 's"  # EvalAI's processor, LLaVA's conversion
    assert official_accuracy("Man's", ["man's"] * 2 + ["x"] * 8) == pytest.approx(0.6)
    assert official_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0  # human answers all alike: not processed
    assert lmms_eval_accuracy("t-shirt", ["t-shirt"] * 10) == 1.0
    assert official_accuracy("Dog\n", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)


def test_vqav2_questions_layout_and_bad_input(tmp_path):
    data = vqav2_dir(tmp_path)
    questions = vqav2_questions(data)
    assert questions[0].image == "COCO_val2014_000000000042.jpg"
    assert questions[0].text == "Question 101?\nAnswer the question using a single word or phrase."
    write_jsonl(data / "llava_vqav2_mscoco_val2014.jsonl", [{"question_id": 7, "image": "x.jpg", "text": "Q?\nA."}])
    assert [(q.question_id, q.image, q.text) for q in vqav2_questions(data)] == [(7, "x.jpg", "Q?\nA.")]
    answers = vqav2_answers(tmp_path / "a.jsonl", {**VQAV2_ANSWERS, 999: "x"})
    with pytest.raises(DataError, match=r"1 unknown question id\(s\).*: 999"):
        score_answers("vqav2", data, answers)
    (data / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(DataError, match="v2_mscoco_val2014_annotations.json: expected VQAv2's val annotations"):
        score_answers("vqav2", data, answers)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="v2_OpenEnded_mscoco_val2014_questions.json: expected VQAv2's val questions"):
        vqav2_questions(tmp_path / "empty")
