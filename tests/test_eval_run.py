"""`tinylmm eval run --data`: a benchmark's question file answered by a tiny random model into
an answer file in LLaVA's format (resumed, missing images reported), and the shapes-POPE round
trip: written in LLaVA's POPE layout, answered, scored by `eval score` to the very numbers the
built-in shapes evaluation computes."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import tinylmm

from tinylmm.api import answer_benchmark, build, load, score_answers
from tinylmm.data.jsonl import read_jsonl
from tinylmm.data.shapes import write_shapes_dataset
from tinylmm.errors import ConfigError, DataError
from tinylmm.eval.pope import QUESTIONS
from tinylmm.eval.shapes import evaluate_shapes, write_shapes_pope

from conftest import TINY

FORMAT = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random checkpoint, the shapes world's POPE (1 image, 18 questions), and its LLaVA layout."""
    root = tmp_path_factory.mktemp("evalrun")
    model, processor = build("toy", [o for o in TINY if o.startswith("model.")])
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: freshly initialised, it repeats one token whatever the prompt
        for w in model.parameters():
            if w.dim() > 1:
                w.normal_(0, 0.2)
    model.save(root / "run" / "final", processor)
    shapes = write_shapes_dataset(
        root / "shapes", n_caption=0, n_instruct=0, n_eval=0, n_pope=1, image_size=processor.image_processor.size
    )["images"]
    return root / "run" / "final", shapes, write_shapes_pope(shapes, root / "pope")


def test_shapes_pope_layout_is_llavas(world):
    _, shapes, pope = world
    questions = read_jsonl(pope / QUESTIONS)
    assert len(questions) == 18 and [q["question_id"] for q in questions] == list(range(1, 19))
    assert {q["category"] for q in questions} == {"random", "popular", "adversarial"}
    assert questions[0]["text"].startswith("Is there ") and "<image>" not in questions[0]["text"]
    for split in ("random", "popular", "adversarial"):
        labels = read_jsonl(pope / "coco" / f"coco_pope_{split}.json")
        assert len(labels) == 6 and {lab["label"] for lab in labels} == {"yes", "no"}
        assert set(labels[0]) == {"question_id", "image", "text", "label"}
    assert (pope / "val2014" / questions[0]["image"]).is_file()
    with pytest.raises(FileExistsError, match="not overwriting"):
        write_shapes_pope(shapes, pope)


def test_round_trip_scores_equal_the_builtin_shapes_pope(world, tmp_path):
    ckpt, shapes, pope = world
    report = answer_benchmark(ckpt, "pope", pope, answers=tmp_path / "a.jsonl", batch_size=1, max_new_tokens=3)
    assert (report.total, report.answered, report.skipped, report.missing_images) == (18, 18, 0, [])
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert all(set(r) == FORMAT for r in rows) and rows[0]["model_id"] == "run/final"
    assert len({r["answer_id"] for r in rows}) == 18
    scores, _ = score_answers("pope", pope, tmp_path / "a.jsonl")

    model, processor = load(ckpt)
    builtin = evaluate_shapes(model, processor, shapes, out=tmp_path / "shapes.json", batch_size=1, max_new_tokens=3)
    predictions = [p["prediction"] for p in json.loads((tmp_path / "shapes.json").read_text())["predictions"]]
    # the same prompts give the same greedy answers, in eval.json's order (question ids 1..18)
    assert [r["text"] for r in sorted(rows, key=lambda r: r["question_id"])] == predictions
    assert len(set(predictions)) > 1  # answers that depend on the question: a mix-up would show
    assert scores["splits"] == builtin["pope"] and scores["n"] == 18 and scores["missing"]["n"] == 0


def test_a_missing_image_is_reported_not_a_crash(world, tmp_path):
    ckpt, _, pope = world
    questions = tmp_path / "pope" / QUESTIONS
    questions.parent.mkdir()
    first = read_jsonl(pope / QUESTIONS)[:2]
    gone = {"question_id": 99, "image": "gone.png", "text": "Is there a cat in the image?", "category": "random"}
    questions.write_text("".join(json.dumps(q) + "\n" for q in [first[0], gone, first[1]]))
    report = answer_benchmark(ckpt, "pope", questions.parent, images=pope / "val2014", answers=tmp_path / "a.jsonl")
    assert report.missing_images == ["99"] and report.answered == 2
    assert [r["question_id"] for r in read_jsonl(tmp_path / "a.jsonl")] == [1, 2]


def test_bad_input_names_the_thing_at_fault(world, tmp_path):
    ckpt, _, pope = world
    with pytest.raises(DataError, match="llava_pope_test.jsonl: expected LLaVA's POPE question file"):
        answer_benchmark(ckpt, "pope", tmp_path)
    with pytest.raises(DataError, match="nowhere: expected the pope images"):
        answer_benchmark(ckpt, "pope", pope, images=tmp_path / "nowhere", answers=tmp_path / "a.jsonl")
    # the list grows with each benchmark: held to its start and sorted order, not to its length
    with pytest.raises(ConfigError, match="'shapes' cannot be answered into .* can: gqa, (.+, )?pope, scienceqa"):
        answer_benchmark(ckpt, "shapes", pope)
    with pytest.raises(ConfigError, match="--limit must be at least 1"):
        answer_benchmark(ckpt, "pope", pope, limit=0)


@pytest.mark.slow
def test_cli_run_resumes_an_answer_file(world, tmp_path):
    ckpt, _, pope = world
    answers = tmp_path / "eval" / "pope-answers.jsonl"
    first = answer_benchmark(ckpt, "pope", pope, answers=answers, limit=5, batch_size=2, max_new_tokens=2)
    assert (first.total, first.answered) == (5, 5) and len(read_jsonl(answers)) == 5
    done = tinylmm(
        "eval", "run", str(ckpt), "--bench", "pope", "--data", str(pope), "--answers", str(answers),
        "--batch-size", "4", "--max-new-tokens", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "13 question(s) answered, 5 already in the answer file, of 18" in " ".join(done.stdout.split())
    assert "13/13" in done.stdout and "questions/s" in done.stdout  # the progress bar's last state
    ids = [r["question_id"] for r in read_jsonl(answers)]
    assert sorted(ids) == list(range(1, 19))  # each once: the first 5 were not asked again
    refused = tinylmm("eval", str(ckpt), "--bench", "pope", "--limit", "3")
    assert refused.returncode == 2 and "--data is needed" in refused.stderr


def test_textvqa_questions_of_one_image_are_told_apart_by_prompt(world, tmp_path):
    """TextVQA's question ids are image ids: two questions on one image are both answered,
    resumed by (id, prompt), and the answers' prompts let `eval score` find their annotations."""
    from PIL import Image

    ckpt, _, _ = world
    data = tmp_path / "textvqa"
    (data / "train_images").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(data / "train_images" / "img1.jpg")
    asked = ["what brand is it?", "what is written on the sign?"]
    rows = [
        {"question_id": "img1", "image": "img1.jpg", "text": f"{q}\nReference OCR token: ACME\nAnswer briefly."}
        for q in asked
    ]
    (data / "llava_textvqa_val_v051_ocr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    annotations = {"data": [{"image_id": "img1", "question": q, "answers": ["acme"] * 10} for q in asked]}
    (data / "TextVQA_0.5.1_val.json").write_text(json.dumps(annotations))
    answers = tmp_path / "t.jsonl"
    first = answer_benchmark(ckpt, "textvqa", data, answers=answers, max_new_tokens=2)
    again = answer_benchmark(ckpt, "textvqa", data, answers=answers, max_new_tokens=2)
    assert (first.answered, again.answered, again.skipped) == (2, 0, 2)
    scores, _ = score_answers("textvqa", data, answers)
    assert scores["n"] == 2 and scores["missing"]["n"] == 0
    # without the OCR tokens: the same questions, the "Reference OCR token:" line left out
    plain = tmp_path / "plain.jsonl"
    assert answer_benchmark(ckpt, "textvqa_no_ocr", data, answers=plain, max_new_tokens=2).answered == 2
    prompts = [json.loads(line)["prompt"] for line in plain.read_text().splitlines()]
    assert prompts == [f"{q}\nAnswer briefly." for q in asked]
    scores, _ = score_answers("textvqa_no_ocr", data, plain)
    assert scores["n"] == 2 and scores["missing"]["n"] == 0


def test_greedy_batched_generation_equals_one_by_one_on_mixed_prompts(world):
    """Left padding is masked: prompts of different lengths, with and without an image, answered
    in one batch get the tokens each gets alone (as `eval run --batch-size` relies on)."""
    from PIL import Image

    from tinylmm.models.generation import generate_batch

    ckpt, _, _ = world
    model, processor = load(ckpt)
    red, blue = Image.new("RGB", (32, 32), (220, 20, 20)), Image.new("RGB", (24, 40), (20, 20, 220))
    convs = [
        [("human", "<image>\nWhat color is the circle?")],
        [("human", "How many shapes are there in the picture, counting every square and every circle?")],
        [("human", "<image>\nIs there a blue square in the image? Answer with one word, yes or no.")],
        [("human", "<image>\nShape?")],
    ]
    images = [[red], [], [blue], [red]]
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6}  # the whole length compared, no early stop
    together = generate_batch(model, processor, convs, images, **kwargs)
    alone = [generate_batch(model, processor, [c], [i], **kwargs)[0] for c, i in zip(convs, images)]
    assert together == alone
    assert len(set(together)) == len(convs)  # the answers depend on the prompt: a test that can fail


def test_resuming_drops_a_last_line_cut_short(world, tmp_path):
    ckpt, _, pope = world
    answers = tmp_path / "a.jsonl"
    answer_benchmark(ckpt, "pope", pope, answers=answers, limit=3, max_new_tokens=2)
    whole = answers.read_text().splitlines()
    answers.write_text("\n".join(whole[:2]) + "\n" + whole[2][:25])  # killed while writing the 3rd
    again = answer_benchmark(ckpt, "pope", pope, answers=answers, limit=4, max_new_tokens=2)
    assert (again.skipped, again.answered) == (2, 2)
    assert [r["question_id"] for r in read_jsonl(answers)] == [1, 2, 3, 4]
    answers.write_text(answers.read_text().rstrip("\n"))  # whole, only its newline missing
    assert answer_benchmark(ckpt, "pope", pope, answers=answers, limit=5, max_new_tokens=2).answered == 1
    assert [r["question_id"] for r in read_jsonl(answers)] == [1, 2, 3, 4, 5]


def test_scienceqa_is_asked_as_llavas_sqa_script_asks_it(world, tmp_path):
    """The single-prediction prompt, "<image>\\n" recorded for an image question, a text-only
    question in the same batch; the answers score against problems.json."""
    from PIL import Image

    ckpt, _, _ = world
    data = tmp_path / "scienceqa"
    (data / "images" / "test" / "7").mkdir(parents=True)
    Image.new("RGB", (30, 30), (10, 200, 10)).save(data / "images" / "test" / "7" / "image.png")
    choices = "Which is green?\nContext: N/A\nOptions: (A) leaf (B) sky"
    questions = [
        {"id": "7", "image": "7/image.png", "conversations": [{"from": "human", "value": f"<image>\n{choices}"}]},
        {"id": "8", "conversations": [{"from": "human", "value": "Which is a number?\nOptions: (A) 3 (B) cat"}]},
    ]
    (data / "llava_test_CQM-A.json").write_text(json.dumps(questions))
    (data / "problems.json").write_text(json.dumps({p: {"choices": ["x", "y"], "answer": 0} for p in ("7", "8")}))
    (data / "pid_splits.json").write_text(json.dumps({"test": ["7", "8"]}))
    report = answer_benchmark(ckpt, "scienceqa", data, answers=tmp_path / "s.jsonl", batch_size=2, max_new_tokens=2)
    assert report.answered == 2 and report.missing_images == []
    prompts = {r["question_id"]: r["prompt"] for r in read_jsonl(tmp_path / "s.jsonl")}
    suffix = "\nAnswer with the option's letter from the given choices directly."
    assert prompts == {"7": f"<image>\n{choices}{suffix}", "8": f"Which is a number?\nOptions: (A) 3 (B) cat{suffix}"}
    scores, _ = score_answers("scienceqa", data, tmp_path / "s.jsonl")
    assert scores["n"] == 2 and scores["n_img"] == 1 and scores["missing"]["n"] == 0


def test_gqa_questions_are_answered_and_scored(world, tmp_path):
    from PIL import Image

    ckpt, _, _ = world
    data = tmp_path / "gqa"
    (data / "data" / "images").mkdir(parents=True)
    Image.new("RGB", (30, 30)).save(data / "data" / "images" / "n1.jpg")
    row = {"question_id": "201", "image": "n1.jpg", "text": "What is it?\nAnswer the question using a single word."}
    (data / "llava_gqa_testdev_balanced.jsonl").write_text(json.dumps(row) + "\n")
    gold = {"201": {"answer": "nothing", "isBalanced": True}}
    (data / "data" / "testdev_balanced_questions.json").write_text(json.dumps(gold))
    report = answer_benchmark(ckpt, "gqa", data, answers=tmp_path / "g.jsonl", max_new_tokens=2)
    assert report.answered == 1 and read_jsonl(tmp_path / "g.jsonl")[0]["prompt"] == row["text"]
    scores, _ = score_answers("gqa", data, tmp_path / "g.jsonl")
    assert scores["n"] == 1 and scores["missing"]["n"] == 0


def test_eval_model_answers_then_scores_beside_the_answers(world, tmp_path):
    """`eval MODEL --data` (api.evaluate_answers) on a folder built by `eval build-pope`: the
    questions whose image is missing are reported, not answered, and scored wrong."""
    from PIL import Image
    from test_eval_pope_builder import write_coco

    from tinylmm.api import build_pope, evaluate_answers

    ckpt, _, _ = world
    pope = build_pope(write_coco(tmp_path), tmp_path / "pope", images=5, questions_per_image=2).out
    (pope / "val2014").mkdir()
    images = sorted({q["image"] for q in read_jsonl(pope / QUESTIONS)})
    for k, name in enumerate(images[1:]):  # the first image is missing
        Image.new("RGB", (32, 32), (40 * k, 200, 10)).save(pope / "val2014" / name)
    gone = [str(q["question_id"]) for q in read_jsonl(pope / QUESTIONS) if q["image"] == images[0]]
    assert len(gone) == 12  # 2 objects, each with a negative, in each of the 3 splits
    with pytest.raises(ConfigError, match="unknown answer rule for pope 'lmms'"):
        evaluate_answers(ckpt, "pope", pope, rule="lmms", answers=tmp_path / "a.jsonl")
    assert not (tmp_path / "a.jsonl").exists()  # the rule is checked before any question is asked
    report, scores, path = evaluate_answers(
        ckpt, "pope", pope, rule="lmms-eval", answers=tmp_path / "a.jsonl", batch_size=16, max_new_tokens=2
    )
    assert (report.total, report.answered, report.missing_images) == (60, 48, gone)
    assert path == tmp_path / "a.scores.json" and json.loads(path.read_text()) == scores
    assert scores["rule"] == "lmms-eval" and scores["n"] == 60 and scores["missing"] == {"n": 12, "ids": gone}
    assert scores == score_answers("pope", pope, tmp_path / "a.jsonl", rule="lmms-eval", out=tmp_path / "b.json")[0]


def eval_cli(*args):
    """`tinylmm eval ...` in this process (a subprocess would load torch again, for seconds)."""
    from typer.testing import CliRunner

    from tinylmm.cli.app import app

    return CliRunner().invoke(app, ["eval", *args], env={"COLUMNS": "1000"})  # one line per message


def test_cli_eval_model_answers_scores_and_prints_the_table(world, tmp_path):
    import shutil

    ckpt, shapes, pope = world
    model = tmp_path / "run" / "final"
    shutil.copytree(ckpt, model)
    done = eval_cli(str(model), "--bench", "pope", "--data", str(pope), "--batch-size", "6", "--max-new-tokens", "3")
    assert done.exit_code == 0, done.output[-2000:]
    answers = tmp_path / "run" / "eval" / "pope-answers.jsonl"
    scores = tmp_path / "run" / "eval" / "pope-answers.scores.json"  # side by side in the run's eval/
    assert len(read_jsonl(answers)) == 18
    written = json.loads(scores.read_text())
    assert written == score_answers("pope", pope, answers, out=tmp_path / "again.json")[0]
    said = done.output
    assert "18 question(s) answered, 0 already in the answer file, of 18" in said
    assert "pope (18 questions, rule: llava)" in said and f"scores: {scores}" in said
    for split in ("random", "popular", "adversarial"):
        assert f"{written['splits'][split]['f1']:.1%}" in said.split(split, 1)[1].splitlines()[0]
    # the built-in shapes benchmark scores itself in both spellings, to the same file
    results = []
    for spelling in ([], ["run"]):
        done = eval_cli(*spelling, str(model), "--data", str(shapes), "--max-new-tokens", "3")
        assert done.exit_code == 0, done.output[-2000:]
        assert f"results: {tmp_path / 'run' / 'eval' / 'shapes.json'}" in done.output
        results.append(json.loads((tmp_path / "run" / "eval" / "shapes.json").read_text())["pope"])
    assert results[0] == results[1] == written["splits"]  # shapes' own POPE splits: the same questions and answers
    refused = eval_cli(str(model), "--data", str(shapes), "--rule", "llava")
    assert isinstance(refused.exception, ConfigError) and "shapes scores itself" in str(refused.exception)


# ---------------------------------------------------------------- bad input, across the benchmarks


def write_json(path, obj, lines=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in obj) if lines else json.dumps(obj))
    return path


def an_answer(qid, text="yes", prompt="q"):
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "a", "model_id": "m", "metadata": {}}


@pytest.mark.parametrize(
    "bench, expected",
    [
        ("pope", "llava_pope_test.jsonl: expected LLaVA's POPE question file"),
        ("scienceqa", "llava_test_CQM-A.json: expected LLaVA's ScienceQA test questions"),
        ("gqa", "llava_gqa_testdev_balanced.jsonl: expected LLaVA's GQA testdev-balanced question file"),
        ("textvqa", "llava_textvqa_val_v051_ocr.jsonl: expected LLaVA's TextVQA question file"),
    ],
)
def test_a_missing_question_file_names_its_path_and_layout_file(world, tmp_path, bench, expected):
    ckpt, _, _ = world
    with pytest.raises(DataError, match=f"missing {tmp_path}/{expected}"):
        answer_benchmark(ckpt, bench, tmp_path)


def test_malformed_layout_entries_name_the_file_and_the_entry(tmp_path):
    answers = write_json(tmp_path / "a.jsonl", [an_answer("1")], lines=True)
    gqa = tmp_path / "gqa"
    write_json(gqa / "data" / "testdev_balanced_questions.json", {"1": {"isBalanced": True}})
    with pytest.raises(DataError, match=r"testdev_balanced_questions.json: question 1 has no 'answer'"):
        score_answers("gqa", gqa, answers)
    write_json(gqa / "data" / "testdev_balanced_questions.json", [{"answer": "yes"}])
    with pytest.raises(DataError, match=r"testdev_balanced_questions.json: GQA's questions are a JSON object"):
        score_answers("gqa", gqa, answers)
    sqa = tmp_path / "scienceqa"
    write_json(sqa / "pid_splits.json", {"test": ["1"]})
    write_json(sqa / "problems.json", {"1": {"choices": ["a", "b"], "answer": 0}})
    write_json(sqa / "llava_test_CQM-A.json", [{"conversations": []}])
    with pytest.raises(DataError, match=r"llava_test_CQM-A.json: question 0 has no 'id'"):
        score_answers("scienceqa", sqa, answers)
    write_json(sqa / "llava_test_CQM-A.json", [{"id": "1"}])
    write_json(sqa / "problems.json", {"1": {"answer": 0}})
    with pytest.raises(DataError, match=r"problems.json: problem 1 has no 'choices'"):
        score_answers("scienceqa", sqa, answers)
    textvqa = tmp_path / "textvqa"
    write_json(textvqa / "TextVQA_0.5.1_val.json", {"data": [{"question": "what?", "answers": ["a"] * 10}]})
    with pytest.raises(DataError, match=r"TextVQA_0.5.1_val.json: data\[0\] has no 'image_id'"):
        score_answers("textvqa", textvqa, answers)


def test_unknown_duplicate_and_missing_ids_are_counted_for_each_benchmark(tmp_path):
    gqa = tmp_path / "gqa"
    write_json(gqa / "data" / "testdev_balanced_questions.json", {q: {"answer": "yes"} for q in ("1", "2", "3")})
    bad = write_json(tmp_path / "bad.jsonl", [an_answer("1"), an_answer("1"), an_answer("7"), an_answer("8")], True)
    with pytest.raises(
        DataError,
        match=r"bad.jsonl: 2 unknown question id\(s\) .*: 7, 8; 1 question id\(s\) answered more than once: 1",
    ):
        score_answers("gqa", gqa, bad)
    some = write_json(tmp_path / "some.jsonl", [an_answer("2")], True)
    scores, _ = score_answers("gqa", gqa, some)
    assert scores["missing"] == {"n": 2, "ids": ["1", "3"]} and scores["metrics"]["accuracy"] == pytest.approx(1 / 3)
    sqa = tmp_path / "scienceqa"
    write_json(sqa / "pid_splits.json", {"test": ["1", "2"]})
    write_json(sqa / "problems.json", {p: {"choices": ["a", "b"], "answer": 0} for p in ("1", "2")})
    write_json(sqa / "llava_test_CQM-A.json", [{"id": "1", "image": "1/image.png"}, {"id": "2"}])
    with pytest.raises(DataError, match=r"1 question id\(s\) answered more than once: 2"):
        score_answers("scienceqa", sqa, write_json(tmp_path / "dup.jsonl", [an_answer("2", "A")] * 2, True))
    scores, _ = score_answers("scienceqa", sqa, write_json(tmp_path / "one.jsonl", [an_answer("2", "A")], True))
    assert scores["missing"] == {"n": 1, "ids": ["1"]} and scores["metrics"] == {"img_accuracy": 0.0, "accuracy": 0.5}


def test_a_question_whose_image_is_missing_is_reported_and_scored_wrong(world, tmp_path):
    """ScienceQA: the image question is not answered (reported), the text-only one is; `eval
    score` then counts the image question wrong and lists it."""
    ckpt, _, _ = world
    sqa = tmp_path / "scienceqa"
    (sqa / "images" / "test").mkdir(parents=True)  # the folder is there, 1/image.png is not
    write_json(sqa / "pid_splits.json", {"test": ["1", "2"]})
    write_json(sqa / "problems.json", {p: {"choices": ["a", "b"], "answer": 0} for p in ("1", "2")})
    turn = [{"from": "human", "value": "<image>\nWhich?\nOptions: (A) a (B) b"}]
    write_json(
        sqa / "llava_test_CQM-A.json",
        [{"id": "1", "image": "1/image.png", "conversations": turn}, {"id": "2", "conversations": turn}],
    )
    report = answer_benchmark(ckpt, "scienceqa", sqa, answers=tmp_path / "s.jsonl", max_new_tokens=2)
    assert (report.answered, report.missing_images) == (1, ["1"])
    scores, _ = score_answers("scienceqa", sqa, tmp_path / "s.jsonl")
    assert (
        scores["missing"] == {"n": 1, "ids": ["1"]}
        and scores["n_img"] == 1
        and scores["metrics"]["img_accuracy"] == 0.0
    )


def test_an_unreadable_image_names_the_question_and_the_file(world, tmp_path):
    from PIL import Image

    ckpt, _, _ = world
    gqa = tmp_path / "gqa"
    (gqa / "data" / "images").mkdir(parents=True)
    Image.new("RGB", (30, 30)).save(gqa / "data" / "images" / "good.jpg")
    (gqa / "data" / "images" / "bad.jpg").write_bytes(b"not a jpeg")
    rows = [{"question_id": q, "image": f"{q}.jpg", "text": "What is it?"} for q in ("good", "bad")]
    write_json(gqa / "llava_gqa_testdev_balanced.jsonl", rows, lines=True)
    answers = tmp_path / "g.jsonl"
    with pytest.raises(DataError, match=r"question bad: .*bad.jpg is not a readable image"):
        answer_benchmark(ckpt, "gqa", gqa, answers=answers, batch_size=1, max_new_tokens=2)
    assert [r["question_id"] for r in read_jsonl(answers)] == ["good"]  # the batch before it is kept
    Image.new("RGB", (30, 30)).save(gqa / "data" / "images" / "bad.jpg")
    again = answer_benchmark(ckpt, "gqa", gqa, answers=answers, batch_size=1, max_new_tokens=2)
    assert (again.skipped, again.answered) == (1, 1)
