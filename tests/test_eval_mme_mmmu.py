"""MME and MMMU val: answer files scored against fixtures written in each benchmark's official
format (MME's release folder and LLaVA's llava_mme.jsonl; MMMU's hub parquet files) to
hand-computed values, each parse rule's edge cases one by one, and both answered by a tiny model."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys

import pytest
import torch
from test_cli import ENV

from tinylmm.api import answer_benchmark, build, score_answers
from tinylmm.data.jsonl import read_jsonl
from tinylmm.errors import ConfigError, DataError
from tinylmm.eval import mme, mmmu

from conftest import TINY


def tinylmm(*args):
    env = {**ENV, "COLUMNS": "1000"}  # rich wraps at the terminal's width: one line per message
    return subprocess.run(
        [sys.executable, "-m", "tinylmm.cli.app", *args], capture_output=True, text=True, env=env, timeout=120
    )


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answer(qid, text, prompt="q"):
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m", "metadata": {}}


# ---------------------------------------------------------------- MME

IMAGE_FOLDERS = ("artwork", "celebrity", "landmark", "posters", "scene")  # the rest keep images beside the .txt


def mme_truth():
    """{subtask: {image stem: [(question as in the ground truth, Yes|No)]}}: one image per
    subtask, two in existence; in color the second question has MME's double space."""
    truth = {
        s: {
            f"{s}1": [
                (f"Is this {s} one? Please answer yes or no.", "Yes"),
                (f"Is it {s}? Please answer yes or no.", "No"),
            ]
        }
        for s in mme.PERCEPTION + mme.COGNITION
    }
    truth["existence"]["dog2"] = [
        ("Is there a dog? Please answer yes or no.", "Yes"),
        ("Is there a cat? Please answer yes or no.", "No"),
    ]
    truth["color"]["color1"][1] = ("Is it red?  Please answer yes or no.", "No")
    truth["text_translation"]["text_translation1"][0] = ("Is '猫' translated as 'cat'? Please answer yes or no.", "Yes")
    return truth


def mme_dir(tmp_path, truth=None):
    """MME/ as LLaVA's layout has it: llava_mme.jsonl (LLaVA's prompts) and the release folder."""
    root = tmp_path / "MME"
    rows = []
    for subtask, images in (truth or mme_truth()).items():
        folder = root / mme.RELEASE / subtask
        if subtask in IMAGE_FOLDERS:
            (folder / "images").mkdir(parents=True)
            (folder / "questions_answers_YN").mkdir()
        else:
            folder.mkdir(parents=True)
        for stem, qa in images.items():
            ext = ".jpg" if subtask in IMAGE_FOLDERS else ".png"
            image = f"{subtask}/images/{stem}{ext}" if subtask in IMAGE_FOLDERS else f"{subtask}/{stem}{ext}"
            (root / mme.RELEASE / image).write_bytes(b"")
            gt = folder / "questions_answers_YN" if subtask in IMAGE_FOLDERS else folder
            (gt / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qa), encoding="utf-8")
            for q, _ in qa:
                text = q.replace("  Please answer yes or no.", "").replace(" Please answer yes or no.", "")
                rows.append(
                    {"question_id": f"{subtask}/{stem}{ext}", "image": image, "text": text + "\n" + mme.SHORT_ANSWER}
                )
    write_jsonl(root / mme.QUESTIONS, rows)
    return root


# (subtask, image stem, question index) -> answer; every other question is answered right
MME_ANSWERS = {
    ("existence", "existence1", 0): "Yes.",  # yes: right
    ("existence", "existence1", 1): "no",  # right
    ("existence", "dog2", 0): "Yes, there is",  # yes: right
    ("existence", "dog2", 1): "maybe",  # other: wrong -> acc 3/4, acc+ 1/2, 125
    ("position", "position1", 1): None,  # no answer -> acc 1/2, acc+ 0, 50
    ("numerical_calculation", "numerical_calculation1", 0): "No",  # wrong -> 50
    ("text_translation", "text_translation1", 0): "No",  # wrong
    ("text_translation", "text_translation1", 1): "n",  # llava: other (wrong), lmms-eval: no (right)
}


def mme_answers(tmp_path, root, overrides=MME_ANSWERS, order=None):
    """An answer file as LLaVA's model_vqa_loader.py writes it for llava_mme.jsonl."""
    rows, truth = [], mme_truth()
    for q in read_jsonl(root / mme.QUESTIONS):
        subtask, name = q["question_id"].split("/")
        stem = name.split(".")[0]
        k = next(i for i, (text, _) in enumerate(truth[subtask][stem]) if text.startswith(q["text"].split("\n")[0]))
        gold = truth[subtask][stem][k][1]
        text = overrides.get((subtask, stem, k), gold)
        if text is not None:
            rows.append(answer(q["question_id"], text, prompt=q["text"]))
    return write_jsonl(tmp_path / "mme-answers.jsonl", rows if order is None else order(rows))


def test_mme_scores_by_calculation_py(tmp_path):
    root = mme_dir(tmp_path)
    scores, _ = score_answers("mme", root, mme_answers(tmp_path, root))
    assert scores["bench"] == "mme" and scores["rule"] == "llava" and scores["n"] == 30
    s = scores["subtasks"]
    assert s["existence"] == {"n": 4, "acc": 0.75, "acc_plus": 0.5, "score": 125.0}
    assert s["position"] == {"n": 2, "acc": 0.5, "acc_plus": 0.0, "score": 50.0}
    assert s["numerical_calculation"]["score"] == 50.0 and s["text_translation"]["score"] == 0.0
    assert s["color"]["score"] == 200.0  # the double-spaced ground truth is found
    assert list(s) == list(mme.PERCEPTION + mme.COGNITION)
    # perception: 125 + 200 (count) + 50 + 7 x 200; cognition: 200 + 50 + 0 + 200
    assert scores["metrics"] == {"perception": 1775.0, "cognition": 450.0}
    assert scores["missing"] == {"n": 1, "ids": ["position/position1.txt: Is it position? Please answer yes or no."]}


def test_mme_lmms_eval_rule_reads_n_as_no(tmp_path):
    root = mme_dir(tmp_path)
    scores, _ = score_answers("mme", root, mme_answers(tmp_path, root), rule="lmms-eval")
    assert scores["rule"] == "lmms-eval" and scores["subtasks"]["text_translation"]["score"] == 50.0
    assert scores["metrics"] == {"perception": 1775.0, "cognition": 500.0}


def test_mme_pairs_by_image_not_by_answer_order(tmp_path):
    root = mme_dir(tmp_path)
    a, _ = score_answers("mme", root, mme_answers(tmp_path, root, order=lambda rows: rows[::-1]))
    b, _ = score_answers("mme", root, mme_answers(tmp_path, root))
    assert a == b


def test_mme_prompt_with_the_yes_no_suffix_matches_too(tmp_path):
    """An answer file whose prompts are the ground-truth questions themselves (no LLaVA suffix)."""
    root = mme_dir(tmp_path)
    rows = []
    for subtask, images in mme_truth().items():
        for stem, qa in images.items():
            ext = ".jpg" if subtask in IMAGE_FOLDERS else ".png"
            rows += [answer(f"{subtask}/{stem}{ext}", a, prompt=q) for q, a in qa]
    scores, _ = score_answers("mme", root, write_jsonl(tmp_path / "a.jsonl", rows))
    assert scores["metrics"] == {"perception": 2000.0, "cognition": 800.0} and scores["missing"]["n"] == 0


@pytest.mark.parametrize(
    "text, official, lmms",
    [
        ("Yes.", "yes", "yes"),
        ("no", "no", "no"),
        ("Yes, there is", "yes", "yes"),
        ("maybe", "other", "other"),
        ("NO", "no", "no"),
        (" yes", "yes", "yes"),  # " yes"[:4] holds "yes"
        ("Not sure", "no", "no"),  # "not " holds "no": the rule's own reading
        ("I think yes", "other", "other"),  # "yes" is past the first 4 characters
        ("n", "other", "no"),
        ("y", "other", "yes"),
        ("..yes", "other", "yes"),  # lmms-eval drops every "." first
        ("", "other", "other"),
    ],
)
def test_mme_answer_parse(text, official, lmms):
    assert mme.read_official(text) == official
    assert mme.read_lmms_eval(text) == lmms


def test_mme_unknown_and_duplicate_answers_are_reported(tmp_path):
    root = mme_dir(tmp_path)
    path = mme_answers(tmp_path, root)
    rows = read_jsonl(path)
    write_jsonl(path, [*rows, rows[0], answer("count/count1.png", "Yes", prompt="Is it a horse?")])
    with pytest.raises(DataError) as e:
        score_answers("mme", root, path)
    assert "1 unknown question id(s)" in str(e.value) and "count/count1.txt: Is it a horse?" in str(e.value)
    assert "1 question id(s) answered more than once: existence/existence1.txt: Is this existence one?" in str(e.value)


def test_mme_missing_layout_files_are_named(tmp_path):
    truth = mme_truth()
    del truth["OCR"]
    root = mme_dir(tmp_path, truth)
    with pytest.raises(DataError, match=r"missing .*MME_Benchmark_release_version/OCR: expected MME's 'OCR' subtask"):
        score_answers("mme", root, mme_answers(tmp_path, root, overrides={}))
    (root / mme.RELEASE / "OCR").mkdir()
    with pytest.raises(DataError, match=r"OCR holds no ground-truth \.txt file"):
        score_answers("mme", root, tmp_path / "nowhere.jsonl")
    (root / mme.RELEASE / "OCR" / "x.txt").write_text("Is it? Please answer yes or no.\tYes\n")
    with pytest.raises(DataError, match=r"x\.txt has 1 questions; MME has 2 per image"):
        score_answers("mme", root, tmp_path / "nowhere.jsonl")
    (root / mme.QUESTIONS).unlink()
    with pytest.raises(DataError, match=r"llava_mme\.jsonl: expected LLaVA's MME question file"):
        mme.MMEBenchmark.questions(root)


def test_mme_questions_and_images_are_where_mme_sh_reads_them(tmp_path):
    root = mme_dir(tmp_path)
    questions = mme.MMEBenchmark.questions(root)
    assert len(questions) == 30 and questions[0].text.endswith("\n" + mme.SHORT_ANSWER)
    assert all((root / mme.MMEBenchmark.images / q.image).is_file() for q in questions)
    assert {q.image for q in questions if q.question_id == "artwork/artwork1.jpg"} == {"artwork/images/artwork1.jpg"}


def test_cli_eval_score_mme(tmp_path):
    root = mme_dir(tmp_path)
    answers = mme_answers(tmp_path, root)
    out = tinylmm(
        "eval",
        "score",
        "--bench",
        "mme",
        "--data",
        str(root),
        "--answers",
        str(answers),
        "--out",
        str(tmp_path / "s.json"),
    )
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "s.json").read_text())["metrics"] == {"perception": 1775.0, "cognition": 450.0}
    assert "rule: llava" in out.stdout and "1 question(s) had no answer" in out.stdout
    assert "1775.0" in out.stdout and "125.0" in out.stdout and "75.0%" in out.stdout  # points, and acc as a fraction


def test_mme_rules_are_llava_and_lmms_eval(tmp_path):
    root = mme_dir(tmp_path)
    with pytest.raises(ConfigError, match="unknown answer rule for mme 'lmms'.*known: llava, lmms-eval"):
        score_answers("mme", root, mme_answers(tmp_path, root), rule="lmms")


# ---------------------------------------------------------------- MMMU

OPTS = ["10", "20", "30", "40"]
# subject -> [(question_type, options, answer as the parquet writes it, the model's answer or None)]
MMMU = {
    "Accounting": [
        ("multiple-choice", OPTS, "B", "B"),  # a bare letter: right
        ("multiple-choice", OPTS, "B", "(B)"),  # right
        ("multiple-choice", OPTS, "C", "The answer is C"),  # " C ": right
        ("multiple-choice", OPTS, "D", "I believe the correct value is 40 dollars"),  # > 5 words, option text: right
        ("multiple-choice", OPTS, "A", "(A) or (C), I pick (C)"),  # several: the last one, C: wrong
        ("multiple-choice", OPTS, "A", "I do not know"),  # none: Random(42)'s 1st draw, A: right
    ],
    "Agriculture": [("multiple-choice", OPTS, "B", "none of these")],  # 2nd draw, A: wrong
    "Architecture_and_Engineering": [("multiple-choice", OPTS, "C", "?")],  # 3rd draw, C: right
    "Electronics": [
        ("open", [], "30", "36 watts"),  # 36 is not 30: wrong
        ("open", [], "30", "The power is 30 W."),  # "is " -> "30 w" -> 30.0: right
        ("open", [], "1000", "It costs 1,000 dollars"),  # 1,000 -> 1000.0: right
        ("open", [], "['24/7', '3.429']", "x = 3.429"),  # "=" on the last line; 3.43 is one of the list: right
        ("open", [], "Transformation", "It is transformation."),  # a gold string inside the answer: right
        ("open", [], "1500", "The result is 1.5e3"),  # scientific: right
    ],
}
for _s in mmmu.SUBJECTS:
    MMMU.setdefault(_s, [("multiple-choice", ["yes", "no"], "A", None if _s == "Sociology" else "A")])


def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 0, 200)).save(buf, format="PNG")
    return buf.getvalue()


def mmmu_dir(tmp_path, subjects=MMMU):
    """The hub dataset MMMU/MMMU as downloaded: <Subject>/validation-00000-of-00001.parquet."""
    import pyarrow as pa  # the mmmu extra, in the dev extras
    import pyarrow.parquet as pq

    root = tmp_path / "mmmu"
    image = {"bytes": png(), "path": "x.png"}
    for subject, rows in subjects.items():
        (root / subject).mkdir(parents=True)
        table = pa.table(
            {
                "id": [f"validation_{subject}_{i}" for i in range(1, len(rows) + 1)],
                "question": [f"<image 1> Question {i}?" for i in range(1, len(rows) + 1)],
                "options": [repr(r[1]) for r in rows],
                "answer": [r[2] for r in rows],
                "question_type": [r[0] for r in rows],
                "image_1": [image] * len(rows),
            }
        )
        pq.write_table(table, root / subject / "validation-00000-of-00001.parquet")
    return root


def mmmu_answers(tmp_path, order=None):
    rows = [
        answer(f"validation_{s}_{i}", r[3]) for s, rs in MMMU.items() for i, r in enumerate(rs, 1) if r[3] is not None
    ]
    return write_jsonl(tmp_path / "mmmu-answers.jsonl", rows if order is None else order(rows))


def test_mmmu_scores_by_eval_utils(tmp_path):
    root = mmmu_dir(tmp_path)
    scores, _ = score_answers("mmmu", root, mmmu_answers(tmp_path))
    assert scores["bench"] == "mmmu" and scores["rule"] == "mmmu" and scores["seed"] == 42 and scores["n"] == 40
    s = scores["subjects"]
    assert s["Accounting"] == {"n": 6, "accuracy": 5 / 6}
    assert s["Agriculture"] == {"n": 1, "accuracy": 0.0} and s["Architecture_and_Engineering"]["accuracy"] == 1.0
    assert s["Electronics"] == {"n": 6, "accuracy": 5 / 6}
    assert s["Sociology"] == {"n": 1, "accuracy": 0.0} and s["Math"] == {"n": 1, "accuracy": 1.0}
    assert list(s) == mmmu.SUBJECTS
    assert scores["metrics"]["accuracy"] == pytest.approx(36 / 40)  # 5 + 0 + 1 + 5 + 25 of the other 26
    assert scores["missing"] == {"n": 1, "ids": ["validation_Sociology_1"]}


def test_mmmu_fallback_draws_follow_mmmus_order_not_the_files(tmp_path):
    root = mmmu_dir(tmp_path)
    a, _ = score_answers("mmmu", root, mmmu_answers(tmp_path, order=lambda rows: rows[::-1]))
    b, _ = score_answers("mmmu", root, mmmu_answers(tmp_path))
    assert a == b
    random.seed(7)  # the global generator is not the one drawn from
    c, _ = score_answers("mmmu", root, mmmu_answers(tmp_path))
    assert c == b


ABCD = dict(zip("ABCD", ["apple", "banana", "cherry", "date"]))


@pytest.mark.parametrize(
    "response, letter",
    [
        ("B", "B"),  # a bare letter
        ("B.", "B"),  # trailing punctuation stripped
        ("(B)", "B"),
        ("The answer is C", "C"),
        ("I would say that the fruit is a date", "D"),  # the choice's text, more than 5 words
        ("(A) is wrong, so (C)", "C"),  # several bracketed: the last
        ("A or B", "B"),  # several bare: the last
        ("(A) or D", "A"),  # a bracketed letter beats a bare one
        ("I would say banana or maybe cherry", "C"),  # several texts: the one written last
    ],
)
def test_mmmu_multi_choice_parse(response, letter):
    assert mmmu.parse_multi_choice(response, ABCD, random.Random(0)) == letter


def test_mmmu_no_letter_falls_back_to_the_seeded_draw():
    for response in ("cherry", "a cherry", "I cannot tell", ""):  # the text in 5 words or fewer is no candidate
        draws = random.Random(mmmu.SEED)
        expected = draws.choice("ABCD")
        assert mmmu.parse_multi_choice(response, ABCD, random.Random(mmmu.SEED)) == expected == "A"
    rng = random.Random(mmmu.SEED)
    assert [mmmu.parse_multi_choice("?", ABCD, rng) for _ in range(3)] == ["A", "A", "C"]


@pytest.mark.parametrize(
    "response, parsed",
    [
        ("36 watts", {"36 watts", 36.0}),
        ("The answer is 1,234.5 kg.", {"1,234.5 kg", 1234.0, 234.5}),  # "1,234" with commas and "234.5" plain
        ("x = 2\ny = 3", {3.0}),  # "=" counts on the last line only
        ("So it is B", {" b", "b "}),  # one character: padded
        # scientific, rounded to 2 decimals; the plain pattern finds "2" and "-3" in it too, as eval_utils's does
        ("Therefore, the value is 2.5e-3", {0.0, 2.0, -3.0}),
        ("Paris", {"paris"}),
    ],
)
def test_mmmu_open_parse(response, parsed):
    assert set(mmmu.parse_open(response)) == parsed


@pytest.mark.parametrize(
    "gold, response, right",
    [
        ("30", "30 W", True),
        ("30", "36 watts", False),
        ("30.00", "The answer is 30", True),  # numbers compared after rounding
        ("0.286", "it is 0.29", True),  # 0.286 rounds to 0.29
        ("four", "4", False),
        ("MgS", "the product is mgs powder", True),  # a gold string inside the prediction
        (["$MgS$", "MgS"], "MgS", True),  # any of a list
        ("b", "So it is B", True),  # " b" matches " b"
        ("b", "about", False),  # no trivial single-letter match
    ],
)
def test_mmmu_eval_open(gold, response, right):
    assert mmmu.eval_open(gold, mmmu.parse_open(response)) is right


def test_mmmu_bad_answer_files_are_reported(tmp_path):
    root = mmmu_dir(tmp_path)
    path = mmmu_answers(tmp_path)
    rows = read_jsonl(path)
    write_jsonl(path, [*rows, rows[0], answer("validation_Accounting_99", "A"), answer("dev_Art_1", "B")])
    with pytest.raises(DataError) as e:
        score_answers("mmmu", root, path)
    assert "2 unknown question id(s) (not in the benchmark's questions): validation_Accounting_99, dev_Art_1" in str(
        e.value
    )
    assert "1 question id(s) answered more than once: validation_Accounting_1" in str(e.value)


def test_mmmu_missing_subject_and_bad_rows_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    subjects = dict(MMMU)
    del subjects["Sociology"]
    root = mmmu_dir(tmp_path, subjects)
    with pytest.raises(DataError, match=r"missing .*mmmu/Sociology/validation-\*\.parquet: expected MMMU's Sociology"):
        score_answers("mmmu", root, mmmu_answers(tmp_path))
    bad = tmp_path / "bad"
    root = mmmu_dir(bad, {**MMMU, "Math": [("multiple-choice", ["a", "b"], "A", "A")]})
    table = pa.table(
        {"id": ["validation_Math_1"], "options": ["not a list"], "answer": ["A"], "question_type": ["open"]}
    )
    pq.write_table(table, root / "Math" / "validation-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"Math/validation-00000-of-00001\.parquet: the options of validation_Math_1"):
        score_answers("mmmu", root, mmmu_answers(tmp_path))
    pq.write_table(pa.table({"id": ["validation_Math_1"]}), root / "Math" / "validation-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"cannot read the columns id, question_type, options, answer"):
        score_answers("mmmu", root, mmmu_answers(tmp_path))


def test_mmmu_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    root = mmmu_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import pyarrow.parquet -> ImportError
    with pytest.raises(ConfigError, match=r"needs pyarrow: pip install 'tinylmm\[mmmu\]'"):
        score_answers("mmmu", root, mmmu_answers(tmp_path))


def test_mmmu_prompts_are_run_llavas():
    mc = mmmu.Problem("validation_Art_1", "Art", "multiple-choice", ["red", "blue"], "A")
    assert mmmu.prompt_of(mc, "<image 1> Which?") == (
        "<image 1> Which?\n\n(A) red\n(B) blue\n\n\nAnswer with the option's letter from the given choices directly."
    )
    assert mmmu.prompt_of(mmmu.Problem("v", "Art", "open", [], "3"), "How many?") == (
        "How many?\n\nAnswer the question using a single word or phrase."
    )


# ---------------------------------------------------------------- answered by a tiny model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("mme-mmmu")
    model, processor = build("toy", [o for o in TINY if o.startswith("model.")])
    torch.manual_seed(0)
    model.save(root / "final", processor)
    return root / "final"


def test_mme_is_answered_then_scored(checkpoint, tmp_path):
    from PIL import Image

    truth = {s: mme_truth()[s] for s in mme.PERCEPTION + mme.COGNITION}
    root = mme_dir(tmp_path, truth)
    for q in read_jsonl(root / mme.QUESTIONS):
        Image.new("RGB", (24, 24), (200, 0, 0)).save(root / mme.RELEASE / q["image"], format="PNG")
    report = answer_benchmark(checkpoint, "mme", root, answers=tmp_path / "a.jsonl", max_new_tokens=2, batch_size=16)
    assert report.answered == 30 and report.missing_images == []
    scores, _ = score_answers("mme", root, tmp_path / "a.jsonl")
    assert scores["n"] == 30 and scores["missing"]["n"] == 0


def test_mmmu_is_answered_with_its_first_image_then_scored(checkpoint, tmp_path):
    root = mmmu_dir(tmp_path)
    report = answer_benchmark(checkpoint, "mmmu", root, answers=tmp_path / "a.jsonl", max_new_tokens=2, limit=8)
    assert report.answered == 8 and report.missing_images == []
    assert (root / "images" / "validation_Accounting_1.png").is_file()
    first = read_jsonl(tmp_path / "a.jsonl")[0]
    assert first["question_id"] == "validation_Accounting_1" and first["prompt"].startswith(
        "<image 1> Question 1?\n\n(A) 10\n"
    )
    scores, _ = score_answers("mmmu", root, tmp_path / "a.jsonl")
    assert scores["n"] == 40 and scores["missing"]["n"] == 32
