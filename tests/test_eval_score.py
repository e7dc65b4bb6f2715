"""`tinylmm eval score`: answer files in LLaVA's answer format scored against benchmark folders
in LLaVA-1.5's eval layout, written here in the official formats, to hand-computed values."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_cli import ENV

from tinylmm.api import score_answers
from tinylmm.errors import ConfigError, DataError
from tinylmm.eval.gqa import convert
from tinylmm.eval.pope import binary_metrics, read_exact
from tinylmm.eval.scienceqa import FAILED, choice_index, parse_choice
from tinylmm.eval.textvqa import normalize, question_of, vqa_accuracy


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answer(qid, text):
    return {"question_id": qid, "prompt": "q", "text": text, "answer_id": f"a{qid}", "model_id": "m", "metadata": {}}


# ---------------------------------------------------------------- POPE

POPE = {  # split: [(question_id, image, label)]
    "random": [(1, "a.jpg", "yes"), (2, "a.jpg", "no"), (3, "b.jpg", "yes"), (4, "b.jpg", "no")],
    "popular": [(5, "a.jpg", "yes"), (6, "a.jpg", "no")],
    "adversarial": [(7, "c.jpg", "yes"), (8, "c.jpg", "no")],
}
POPE_ANSWERS = {
    1: "Yes, there is a dog.",  # llava: yes; lmms-eval: neither yes nor no
    2: "No",
    3: "There is not a cat",  # llava: no; lmms-eval: neither
    4: "Yes",
    # 5 has no answer: scored wrong (as "no" on its yes label)
    6: "no.",  # llava: no (first sentence); lmms-eval: "no." is not "no"
    7: " YES ",  # both: yes
    8: "yes",
}


def pope_dir(tmp_path):
    root = tmp_path / "pope"
    questions = []
    for split, rows in POPE.items():
        labels = [
            {"question_id": k, "image": img, "text": "Is there a dog?", "label": lab}
            for k, (_, img, lab) in enumerate(rows, 1)
        ]
        write_jsonl(root / "coco" / f"coco_pope_{split}.json", labels)
        questions += [
            {"question_id": q, "image": img, "text": "Is there a dog?", "category": split} for q, img, _ in rows
        ]
    write_jsonl(root / "llava_pope_test.jsonl", questions)
    return root


def pope_answers(tmp_path, answers=POPE_ANSWERS):
    return write_jsonl(tmp_path / "answers.jsonl", [answer(q, t) for q, t in answers.items()])


def test_pope_llava_rule(tmp_path):
    scores, out = score_answers("pope", pope_dir(tmp_path), pope_answers(tmp_path))
    assert json.loads(out.read_text()) == scores and out.name == "answers.scores.json"
    assert scores["bench"] == "pope" and scores["rule"] == "llava" and scores["n"] == 8
    s = scores["splits"]
    assert s["random"] == {"n": 4, "accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}
    assert s["popular"] == {"n": 2, "accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    assert s["adversarial"] == pytest.approx(
        {"n": 2, "accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 1.0}
    )
    assert scores["metrics"] == pytest.approx(
        {"accuracy": 0.5, "precision": 1 / 3, "recall": 0.5, "f1": 7 / 18, "yes_ratio": 0.5}
    )
    assert scores["missing"] == {"n": 1, "ids": ["5"]}


def test_pope_lmms_eval_rule(tmp_path):
    scores, _ = score_answers(
        "pope", pope_dir(tmp_path), pope_answers(tmp_path), rule="lmms-eval", out=tmp_path / "s.json"
    )
    assert scores["rule"] == "lmms-eval"
    s = scores["splits"]
    # random: only "No" matches; the one yes answer is on a no label; no exact "no" on a yes label
    assert s["random"] == {"n": 4, "accuracy": 0.25, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.25}
    assert s["popular"] == {"n": 2, "accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    assert s["adversarial"]["f1"] == pytest.approx(2 / 3)
    assert scores["metrics"] == pytest.approx(
        {"accuracy": 0.25, "precision": 1 / 6, "recall": 1 / 3, "f1": 2 / 9, "yes_ratio": 5 / 12}
    )


@pytest.mark.parametrize(
    "text, read",
    [("yes", "yes"), (" Yes \n", "yes"), ("NO", "no"), ("yes.", "yes."), ("Yes, there is", "yes, there is"), ("", "")],
)
def test_lmms_eval_reading_is_exact_after_lower_strip(text, read):
    assert read_exact(text) == read


def test_binary_metrics_wants_yes_no_labels():
    with pytest.raises(ValueError, match="not 'Yes'"):
        binary_metrics(["yes"], ["Yes"])


def test_pope_answer_order_does_not_matter(tmp_path):
    shuffled = dict(reversed(list(POPE_ANSWERS.items())))
    a, _ = score_answers("pope", pope_dir(tmp_path), pope_answers(tmp_path, shuffled))
    b, _ = score_answers("pope", pope_dir(tmp_path), pope_answers(tmp_path))
    assert a == b


def test_pope_bad_answer_ids_are_counted_and_named(tmp_path):
    data = pope_dir(tmp_path)
    rows = [answer(q, t) for q, t in POPE_ANSWERS.items()] + [answer(99, "yes"), answer(98, "no"), answer(2, "yes")]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(
        DataError, match=r"2 unknown question id\(s\).*: 99, 98; 1 question id\(s\) answered more than once: 2"
    ):
        score_answers("pope", data, path)
    write_jsonl(path, [{"question_id": 1}])
    with pytest.raises(DataError, match="answer 1 has no 'text'"):
        score_answers("pope", data, path)
    path.write_text('{"question_id": 1, "text": "yes"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not JSON"):
        score_answers("pope", data, path)


def test_pope_missing_and_inconsistent_layout_files(tmp_path):
    data, answers = pope_dir(tmp_path), pope_answers(tmp_path)
    (data / "coco" / "coco_pope_popular.json").unlink()
    with pytest.raises(DataError, match=r"missing .*coco/coco_pope_popular.json: expected POPE's popular label file"):
        score_answers("pope", data, answers)
    data = pope_dir(tmp_path)
    write_jsonl(data / "coco" / "coco_pope_popular.json", [{"image": "a.jpg", "label": "yes"}])
    with pytest.raises(DataError, match="has 2 'popular' questions but .*coco_pope_popular.json has 1 labels"):
        score_answers("pope", data, answers)
    data = pope_dir(tmp_path)
    write_jsonl(
        data / "coco" / "coco_pope_popular.json",
        [{"image": "z.jpg", "label": "yes"}, {"image": "a.jpg", "label": "no"}],
    )
    with pytest.raises(DataError, match=r"line 1 is about z.jpg but the 1-th 'popular' question \(id 5\)"):
        score_answers("pope", data, answers)
    (data / "llava_pope_test.jsonl").unlink()
    with pytest.raises(DataError, match="missing .*llava_pope_test.jsonl: expected LLaVA's POPE question file"):
        score_answers("pope", data, answers)
    with pytest.raises(DataError, match="missing .*nowhere.jsonl: expected the answer file"):
        score_answers("pope", pope_dir(tmp_path), tmp_path / "nowhere.jsonl")
    with pytest.raises(DataError, match="expected the pope folder of LLaVA-1.5's eval layout"):
        score_answers("pope", tmp_path / "no-such-dir", answers)


def test_unknown_rule_and_benchmark_without_a_scorer(tmp_path):
    with pytest.raises(ConfigError, match="unknown answer rule for pope 'lmms'.*did you mean 'lmms-eval'"):
        score_answers("pope", pope_dir(tmp_path), pope_answers(tmp_path), rule="lmms")
    with pytest.raises(ConfigError, match="benchmark 'shapes' cannot score an answer file; those that can: .*pope"):
        score_answers("shapes", tmp_path, tmp_path / "a.jsonl")
    with pytest.raises(ConfigError, match="unknown benchmark 'popp'.*did you mean 'pope'"):
        score_answers("popp", tmp_path, tmp_path / "a.jsonl")


# ---------------------------------------------------------------- ScienceQA-IMG

SQA = {  # pid: (number of choices, right index, has an image, answer text or None)
    "1": (3, 0, True, "A"),
    "2": (2, 1, False, "B. the second"),
    "3": (4, 2, True, "The answer is C."),
    "4": (3, 2, False, "C."),  # FAILED: not a bare letter, no ". " after it
    "5": (2, 0, True, None),  # unanswered: FAILED, wrong, and still in the IMG total
}


def scienceqa_dir(tmp_path):
    root = tmp_path / "scienceqa"
    root.mkdir()
    problems = {
        pid: {
            "question": "?",
            "choices": [f"c{i}" for i in range(n)],
            "answer": right,
            "image": "image.png" if img else None,
        }
        for pid, (n, right, img, _) in SQA.items()
    }
    problems["9"] = {"question": "?", "choices": ["x", "y"], "answer": 0, "image": None}
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["9"], "test": list(SQA)}))
    questions = [
        {"id": pid, "conversations": [], **({"image": f"{pid}/image.png"} if img else {})}
        for pid, (_, _, img, _) in SQA.items()
    ]
    (root / "llava_test_CQM-A.json").write_text(json.dumps(questions))
    answers = [answer(pid, text) for pid, (_, _, _, text) in SQA.items() if text is not None]
    return root, write_jsonl(tmp_path / "sqa-answers.jsonl", answers)


def test_scienceqa_img_and_overall_accuracy(tmp_path):
    data, answers = scienceqa_dir(tmp_path)
    scores, _ = score_answers("scienceqa", data, answers)
    assert scores["rule"] == "llava" and scores["n"] == 5 and scores["n_img"] == 3
    assert scores["metrics"] == pytest.approx({"img_accuracy": 2 / 3, "accuracy": 3 / 5})
    assert scores["failed"] == 2 and scores["missing"] == {"n": 1, "ids": ["5"]}
    with pytest.raises(ConfigError, match="unknown answer rule for scienceqa 'lmms-eval'.*known: llava"):
        score_answers("scienceqa", data, answers, rule="lmms-eval")
    write_jsonl(answers, [answer("9", "A")])  # a train problem is not a test question
    with pytest.raises(DataError, match=r"1 unknown question id\(s\).*: 9"):
        score_answers("scienceqa", data, answers)
    (data / "pid_splits.json").unlink()
    with pytest.raises(DataError, match="missing .*pid_splits.json: expected ScienceQA's pid_splits.json"):
        score_answers("scienceqa", data, answers)


@pytest.mark.parametrize(
    "text, letter",
    [
        ("A", "A"),  # a bare letter
        ("E", "E"),
        ("F", FAILED),  # beyond the five options
        ("a", FAILED),  # case counts
        (" A", FAILED),  # no stripping
        ("A.", FAILED),  # "X. " needs the space and a third character
        ("B. a cat", "B"),
        ("B.a cat", FAILED),
        ("The answer is C.", "C"),
        ("Because ... The answer is D!", "D"),  # the regex's "." is any character
        ("The answer is C", FAILED),  # ... but one must follow the letter
        ("The answer is A. Or: The answer is B.", FAILED),  # two matches
        ("The answer is Z.", "Z"),  # parsed, then out of range below
    ],
)
def test_scienceqa_parse(text, letter):
    assert parse_choice(text) == letter


def test_scienceqa_letter_index_is_bounded_by_the_choices():
    assert choice_index("B", 2) == 1 and choice_index("C", 2) == -1 and choice_index("Z", 5) == -1
    assert choice_index(FAILED, 5) == -1


# ---------------------------------------------------------------- GQA


def test_gqa_accuracy_over_balanced_questions(tmp_path):
    root = tmp_path / "gqa"
    (root / "data").mkdir(parents=True)
    questions = {
        "q1": {"answer": "yes", "isBalanced": True},
        "q2": {"answer": "red", "isBalanced": True},
        "q3": {"answer": "table", "isBalanced": True},
        "q4": {"answer": "left", "isBalanced": False},  # not counted
        "q5": {"answer": "no", "isBalanced": True},  # unanswered: wrong
    }
    (root / "data" / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    answers = write_jsonl(
        tmp_path / "gqa.jsonl",
        [answer("q1", "Yes."), answer("q2", "Red.."), answer("q3", "a table"), answer("q4", "left")],
    )
    scores, _ = score_answers("gqa", root, answers)
    assert scores["n"] == 4 and scores["metrics"] == {"accuracy": 0.5}
    assert scores["missing"] == {"n": 1, "ids": ["q5"]}
    (root / "data" / "testdev_balanced_questions.json").unlink()
    with pytest.raises(
        DataError, match="data/testdev_balanced_questions.json: expected GQA's testdev-balanced questions"
    ):
        score_answers("gqa", root, answers)


@pytest.mark.parametrize(
    "text, prediction",
    [("Yes.", "yes"), ("Red...", "red"), ("U.S.", "u.s"), (" Yes", " yes"), ("Yes. ", "yes. "), ("3", "3")],
)
def test_gqa_conversion(text, prediction):
    assert convert(text) == prediction


# ---------------------------------------------------------------- TextVQA

OCR_PROMPT = "{q}\nReference OCR token: NIKE, JUST\nAnswer the question using a single word or phrase."


def textvqa_dir(tmp_path):
    root = tmp_path / "textvqa"
    root.mkdir()
    data = [
        {
            "question_id": 1,
            "image_id": "img1",
            "question": "What brand is this?",
            "answers": ["Nike", "nike."] + ["adidas"] * 8,
        },
        {"question_id": 2, "image_id": "img1", "question": "What color?", "answers": ["red"] * 10},
        {"question_id": 3, "image_id": "img2", "question": "How many?", "answers": ["two"] * 2 + ["3"] * 8},
    ]
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    return root


def textvqa_answer(image_id, prompt, text):
    return {**answer(image_id, text), "prompt": prompt}


def test_textvqa_vqa_accuracy(tmp_path):
    data = textvqa_dir(tmp_path)
    rows = [
        # LLaVA's question_id is the image id; the question comes back from the prompt
        textvqa_answer("img1", OCR_PROMPT.format(q="What brand is this?"), "NIKE"),  # 2 of 10 humans: 0.6
        textvqa_answer("img1", "What color?\nAnswer the question using a single word or phrase.", "Red."),  # 1.0
        # img2's question is unanswered: 0
    ]
    answers = write_jsonl(tmp_path / "tv.jsonl", rows)
    scores, _ = score_answers("textvqa", data, answers)
    assert scores["n"] == 3 and scores["metrics"]["accuracy"] == pytest.approx((0.6 + 1.0 + 0) / 3)
    assert scores["missing"] == {"n": 1, "ids": ["img2: how many?"]}
    write_jsonl(answers, rows + [rows[0], textvqa_answer("img3", "What?\nAnswer.", "x")])
    with pytest.raises(
        DataError,
        match=r"1 unknown question id\(s\).*img3: what\?; 1 question id\(s\) answered more than once: img1: what brand",
    ):
        score_answers("textvqa", data, answers)
    write_jsonl(answers, [textvqa_answer("img1", "one line only", "x")])
    with pytest.raises(DataError, match="answer to img1: a prompt in none of LLaVA's TextVQA forms"):
        score_answers("textvqa", data, answers)


def test_textvqa_prompt_forms():
    assert question_of("OCR tokens: nike, just Question: What Brand? Short answer:") == "what brand?"
    assert question_of(OCR_PROMPT.format(q="What Brand?")) == "what brand?"
    assert question_of("Reference OCR token: NIKE\nWhat Brand?\nAnswer briefly.") == "what brand?"
    assert question_of("What Brand?\nAnswer the question using a single word or phrase.") == "what brand?"
    for prompt in ("What brand?", "a\nb\nc", "OCR tokens: x What brand?"):
        with pytest.raises(ValueError):
            question_of(prompt)


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The Dog.", "dog"),  # lower case, article dropped, final period deleted
        ("two dogs", "2 dogs"),  # number words become digits
        ("none", "0"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("U.S.A.", "usa"),
        ("coca-cola", "coca cola"),  # punctuation with no space beside it becomes a space
        ("coca - cola", "coca cola"),  # ... and is deleted when a space is beside it
        ("1,000", "1000"),  # commas are deleted first
        ("Yes?", "yes"),
        ("it's red!", "it 's red"),  # "'s" split off
        ("dont", "don't"),  # a contraction missing its apostrophe gets it back
        ("couldnt've", "couldn't've"),
        ("wed", "wed"),  # a word, not "we'd"
        ("a\tb\nc", "b c"),
        ("(c)", "c"),
    ],
)
def test_evalai_normalization(text, normalized):
    assert normalize(text) == normalized


def test_vqa_accuracy_is_the_leave_one_out_mean():
    assert vqa_accuracy("nike", ["nike"] * 2 + ["x"] * 8) == pytest.approx(0.6)  # (2 * 1/3 + 8 * 2/3) / 10
    assert vqa_accuracy("nike", ["nike"] * 3 + ["x"] * 7) == pytest.approx(0.9)  # (3 * 2/3 + 7) / 10
    assert vqa_accuracy("The Nike.", ["nike"] * 4 + ["x"] * 6) == 1.0
    assert vqa_accuracy("puma", ["nike"] * 10) == 0.0


# ---------------------------------------------------------------- CLI


def tinylmm(*args):
    env = {**ENV, "COLUMNS": "1000"}  # rich wraps at the terminal's width: one line per message
    return subprocess.run(
        [sys.executable, "-m", "tinylmm.cli.app", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_eval_score(tmp_path):
    data, answers = pope_dir(tmp_path), pope_answers(tmp_path)
    out = tinylmm(
        "eval",
        "score",
        "--bench",
        "pope",
        "--data",
        str(data),
        "--answers",
        str(answers),
        "--rule",
        "lmms-eval",
        "--out",
        str(tmp_path / "s.json"),
    )
    assert out.returncode == 0, out.stderr
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["rule"] == "lmms-eval" and scores["metrics"]["accuracy"] == pytest.approx(0.25)
    assert "rule: lmms-eval" in out.stdout and "1 question(s) had no answer" in out.stdout
    (data / "coco" / "coco_pope_random.json").unlink()
    out = tinylmm("eval", "score", "--bench", "pope", "--data", str(data), "--answers", str(answers))
    assert out.returncode == 2 and "coco_pope_random.json: expected POPE's random label file" in out.stderr


def test_cli_eval_model_and_eval_run_read_the_checkpoint(tmp_path):
    """`tinylmm eval MODEL` (answer and score) and `eval run MODEL` both load MODEL (here: no checkpoint)."""
    for args in (["eval", str(tmp_path)], ["eval", "run", str(tmp_path)]):
        out = tinylmm(*args)
        assert out.returncode == 2 and "is not a tinylmm checkpoint" in out.stderr, out.stderr


def test_training_cannot_name_a_score_only_benchmark():
    from tinylmm.config import resolve

    with pytest.raises(
        ConfigError, match="benchmark 'pope' in eval.bench cannot be run on a model; those that can: shapes"
    ):
        resolve("toy", "share", ["eval.bench=[pope]"])
