"""The judge-scored benchmarks (LLaVA-Bench COCO and In-the-Wild, MM-Vet): fixtures in the
official formats, judged by a small chat-completions server on 127.0.0.1 that answers canned
replies chosen from the request, scored to hand-computed values."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_eval_score import answer, write_jsonl

from tinylmm.api import score_answers
from tinylmm.errors import ConfigError
from tinylmm.eval import BENCHMARKS
from tinylmm.eval.judge import JudgeClient, JudgeError, prompts
from tinylmm.eval.llava_bench import parse_score
from tinylmm.eval.mmvet import parse_correctness

KEY = "sk-test"


class Judge:
    """A chat-completions endpoint in a thread: `reply(request) -> text` (or (status, body)
    to answer something else); every request's JSON body and headers are kept."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append(body)
                judge.headers.append(dict(self.headers))
                out = judge.reply(body)
                status, data = out if isinstance(out, tuple) else (200, completion(out, body["model"]))
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def completion(text: str, model: str) -> bytes:
    return json.dumps(
        {
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        }
    ).encode()


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    servers = []

    def start(reply):
        servers.append(Judge(reply))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def user_text(request: dict) -> str:
    return request["messages"][-1]["content"]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_the_prompts_are_the_official_ones():
    """judge_prompts.yaml's text is byte for byte LLaVA's rule.json and MM-Vet's evaluator prompt
    (sha256 of the texts at the commits the file names)."""
    rules = prompts()["llava_bench"]["rules"]
    for c in ("conv", "detail", "complex"):
        assert sha(rules[c]["prompt"]) == "a73b4b7bb781472c8997cc44cfe058aa2701a624ddb3ee22f4ff18ce02700dff"
        assert sha(rules[f"llava_bench_{c}"]["prompt"]) == (
            "2ce22b562d6008864970ea863ac8a4d385ea6f2e64ab1313a23f825202a9529d"
        )
        assert rules[c]["role"] == "Assistant"
    assert sha(prompts()["mmvet"]["prompt"]) == "d1b3e0a5b4e72c888b77164489d705bba4dd149934fff564dfba6443d81afe3f"


# ---------------------------------------------------------------- LLaVA-Bench

WILD_QUESTIONS = [  # question_id, image, text, category
    (0, "001.jpg", "What is the name of this dish?", "conv"),
    (1, "001.jpg", "Describe the image in detail.", "detail"),
    (2, "002.jpg", "Why might this be funny?", "complex"),
    (3, "002.jpg", "What colour is the cat?", "conv"),
]
WILD_REPLIES = {  # question -> the judge's review (reference, model)
    "What is the name of this dish?": "8 6\nAssistant 1 names the dish.",
    "Describe the image in detail.": "9,5\nAssistant 2 misses the bowl.",
    "Why might this be funny?": "Assistant 1 is better.\n8 4",  # no score line: [-1, -1]
    "What colour is the cat?": "10 10",
}


def wild_dir(tmp_path):
    root = tmp_path / "llava-bench-in-the-wild"
    write_jsonl(
        root / "questions.jsonl",
        [{"question_id": q, "image": img, "text": t, "category": c} for q, img, t, c in WILD_QUESTIONS],
    )
    write_jsonl(
        root / "context.jsonl",
        [
            {"id": "001", "image": "001.jpg", "caption": ["A bowl of ramen.", "Chopsticks beside it."]},
            {"id": "002", "image": "002.jpg", "caption": "A cat in a box."},
        ],
    )
    write_jsonl(root / "answers_gpt4.jsonl", [{"question_id": q, "text": f"reference {q}"} for q, *_ in WILD_QUESTIONS])
    return root


def by_question(replies):
    def reply(request):
        text = user_text(request)
        return next(r for q, r in replies.items() if f"[Question]\n{q}\n\n" in text)

    return reply


def test_llava_bench_in_the_wild_requests_and_scores(tmp_path, serve):
    judge = serve(by_question(WILD_REPLIES))
    answers = write_jsonl(tmp_path / "answers.jsonl", [answer(q, f"model {q}") for q, *_ in WILD_QUESTIONS])
    scores, out = score_answers(
        "llava_bench_in_the_wild", wild_dir(tmp_path), answers, judge_url=judge.url, judge_model="judge-1"
    )
    assert len(judge.requests) == 4 and judge.headers[0]["Authorization"] == f"Bearer {KEY}"
    first = judge.requests[0]
    assert first["model"] == "judge-1" and first["temperature"] == 0.2 and first["max_tokens"] == 1024
    assert first["messages"][0] == {
        "role": "system",
        "content": "You are a helpful and precise assistant for checking the quality of the answer.",
    }
    wild_prompt = prompts()["llava_bench"]["rules"]["llava_bench_conv"]["prompt"]
    assert user_text(first) == (
        "[Context]\nA bowl of ramen.\nChopsticks beside it.\n\n[Question]\nWhat is the name of this dish?\n\n"
        "[Assistant 1]\nreference 0\n\n[End of Assistant 1]\n\n[Assistant 2]\nmodel 0\n\n[End of Assistant 2]\n\n"
        f"[System]\n{wild_prompt}\n\n"
    )
    assert "[Context]\nA cat in a box.\n\n" in user_text(judge.requests[2])
    # conv [8, 6], [10, 10]; detail [9, 5]; complex [-1, -1] (kept in the means, as LLaVA does)
    assert scores["bench"] == "llava_bench_in_the_wild" and scores["rule"] == "llava" and scores["n"] == 4
    conv = scores["subtasks"]["conv"]
    assert conv["n"] == 2 and conv["relative_score"] == 0.889  # 8 / 9 -> 88.9
    assert conv["reference_score"] == 0.9 and conv["model_score"] == 0.8
    assert scores["subtasks"]["detail"]["relative_score"] == 0.556  # 5 / 9 -> 55.6
    assert scores["subtasks"]["complex"]["relative_score"] == 1.0  # -1 / -1
    # all: reference (8 + 9 - 1 + 10) / 4 = 6.5, model (6 + 5 - 1 + 10) / 4 = 5 -> 76.9, 65.0, 50.0
    assert scores["metrics"] == {"relative_score": 0.769, "model_score": 0.5, "reference_score": 0.65}
    assert scores["means"] == {"model": 5.0, "reference": 6.5}
    assert scores["unparsed"] == {"n": 1, "ids": ["2"]}
    assert scores["judge"]["requests"] == 4 and scores["judge"]["cached"] == 0
    assert json.loads(out.read_text()) == scores


def test_llava_bench_coco_context_has_captions_and_boxes(tmp_path, serve):
    root = tmp_path / "coco2014_val_qa_eval"
    questions = [(0, "conv"), (1, "detail"), (2, "complex")]
    write_jsonl(
        root / "qa90_questions.jsonl",
        [{"question_id": q, "image": "000000441147.jpg", "text": f"question {q}", "category": c} for q, c in questions],
    )
    write_jsonl(
        root / "qa90_gpt4_answer.jsonl", [{"question_id": q, "text": f"gpt4 {q}", "category": c} for q, c in questions]
    )
    write_jsonl(
        root / "caps_boxes_coco2014_val_80.jsonl",
        [
            {
                "id": "000000441147",
                "image": "000000441147.jpg",
                "captions": ["Two suitcases.", "Luggage stacked."],
                "instances": [
                    {"category": "suitcase", "bbox": [0.1, 0.25, 0.5, 0.9]},
                    {"category": "person", "bbox": [0, 0, 1, 1]},
                ],
            }
        ],
    )
    replies = {"question 0": "8 8", "question 1": "10 5", "question 2": "6 3"}
    judge = serve(lambda r: next(v for k, v in replies.items() if f"[Question]\n{k}\n" in user_text(r)))
    answers = write_jsonl(tmp_path / "a.jsonl", [answer(0, "black and brown"), answer(2, "they are old")])
    scores, _ = score_answers(
        "llava_bench_coco", root, answers, judge_url=judge.url + "/chat/completions", judge_model="j"
    )
    text = user_text(judge.requests[0])
    coco_prompt = prompts()["llava_bench"]["rules"]["conv"]["prompt"]
    assert text.startswith(
        "[Context]\nTwo suitcases.\nLuggage stacked.\n\nsuitcase: [0.1, 0.25, 0.5, 0.9]\nperson: [0, 0, 1, 1]\n\n"
        "[Question]\nquestion 0\n\n[Assistant 1]\ngpt4 0\n\n[End of Assistant 1]\n\n[Assistant 2]\nblack and brown"
    )
    assert text.endswith(f"[System]\n{coco_prompt}\n\n") and "bounding box" in coco_prompt
    # question 1 has no answer: judged with an empty one, listed as missing
    assert "[Assistant 2]\n\n\n[End of Assistant 2]" in user_text(judge.requests[1])
    assert scores["missing"] == {"n": 1, "ids": ["1"]}
    # reference (8 + 10 + 6) / 3 = 8, model (8 + 5 + 3) / 3 = 5.333 -> 66.7
    assert scores["metrics"] == {"relative_score": 0.667, "model_score": 0.533, "reference_score": 0.8}
    assert [scores["subtasks"][c]["relative_score"] for c in ("conv", "detail", "complex")] == [1.0, 0.5, 0.5]


@pytest.mark.parametrize(
    "review, expected",
    [
        ("8 7", [8.0, 7.0]),
        ("8,7", [8.0, 7.0]),  # commas become spaces
        ("8.5 6\nAssistant 1 is more detailed.", [8.5, 6.0]),  # only the first line counts
        ("8, 7", [-1, -1]),  # "8  7": three pieces on single spaces
        ("8 7 6", [-1, -1]),
        ("Assistant 1: 8", [-1, -1]),  # two pieces, not numbers
        ("The first assistant is better.", [-1, -1]),
        ("", [-1, -1]),
    ],
)
def test_llava_score_line(review, expected):
    assert parse_score(review) == expected


# ---------------------------------------------------------------- MM-Vet

MMVET = {
    "v1_0": {"imagename": "v1_0.png", "capability": ["ocr", "math"], "question": "What is x?", "answer": "-1<AND>-5"},
    "v1_1": {"imagename": "v1_1.png", "capability": ["rec"], "question": "What animal?", "answer": "cat<OR>kitten"},
    "v1_2": {"imagename": "v1_2.png", "capability": ["rec", "know"], "question": "Who painted it?", "answer": "Monet"},
    "v1_3": {"imagename": "v1_3.png", "capability": ["ocr"], "question": "What does it say?", "answer": "STOP"},
    "v1_4": {"imagename": "v1_4.png", "capability": ["rec"], "question": "What colour?", "answer": "red"},
}


def mmvet_dir(tmp_path):
    root = tmp_path / "mm-vet"
    root.mkdir()
    (root / "mm-vet.json").write_text(json.dumps(MMVET))
    write_jsonl(
        root / "llava-mm-vet.jsonl",
        [{"question_id": int(k[3:]), "image": v["imagename"], "text": v["question"]} for k, v in MMVET.items()],
    )
    return root


def test_mmvet_requests_retries_and_scores(tmp_path, serve):
    def reply(request):
        text = user_text(request)
        retry = text.endswith("\nPredict the correctness of the answer (digit): ")
        if "What is x?" in text:
            return "0.5"
        if "What animal?" in text:  # "Correctness: 0.7" does not parse; the first retry's does
            return "0.7" if retry else "Correctness: 0.7"
        if "Who painted it?" in text:  # never parses in the replies read: falls back to 0.0
            return "1.0" if request["temperature"] == 2.0 else "high"
        return "1.0 right"

    judge = serve(reply)
    answers = write_jsonl(
        tmp_path / "a.jsonl", [answer(q, t) for q, t in [(0, "x = -1"), (1, "a cat"), (2, "Picasso"), (3, "STOP")]]
    )
    scores, _ = score_answers("mmvet", mmvet_dir(tmp_path), answers, judge_url=judge.url, judge_model="gpt-4-0613")
    first = judge.requests[0]
    assert first["model"] == "gpt-4-0613" and first["temperature"] == 0.0 and first["max_tokens"] == 3
    assert first["messages"] == [
        {"role": "user", "content": prompts()["mmvet"]["prompt"] + "\nWhat is x? | -1 <AND> -5 | x = -1 | "}
    ]
    animal = [r for r in judge.requests if "What animal?" in user_text(r)]
    assert [r["temperature"] for r in animal] == [0.0, 0.0]
    assert user_text(animal[1]) == user_text(animal[0]) + "\nPredict the correctness of the answer (digit): "
    painted = [r for r in judge.requests if "Who painted it?" in user_text(r)]
    assert [r["temperature"] for r in painted] == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]  # the 6th reply is not read
    # v1_4 has no answer: 0.0, no request
    assert len(judge.requests) == 1 + 2 + 6 + 1
    assert scores["fallback"] == {"n": 1, "ids": ["v1_2"]} and scores["missing"] == {"n": 1, "ids": ["v1_4"]}
    # scores 0.5, 0.7, 0.0, 1.0, 0.0
    assert scores["metrics"]["total"] == pytest.approx(2.2 / 5)
    assert list(scores["subtasks"]) == ["rec", "ocr", "math", "know"]  # by how many questions need each
    assert scores["subtasks"]["rec"] == {"n": 3, "total": pytest.approx(0.7 / 3)}
    assert scores["subtasks"]["ocr"] == {"n": 2, "total": pytest.approx(0.75)}
    assert scores["subtasks"]["math"] == {"n": 1, "total": 0.5} and scores["subtasks"]["know"] == {"n": 1, "total": 0.0}
    assert scores["integrations"]["rec"] == {"n": 2, "total": pytest.approx(0.35)}
    assert scores["integrations"]["math_ocr"] == {"n": 1, "total": 0.5}


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("0.5", 0.5),
        ("1.0 because all parts match", 1.0),
        ("0.0\n", 0.0),
        ("Correctness: 0.7", None),  # the text before the first space is not a number
        (" 0.3", None),  # nor is the empty text before a leading space
        ("1.5", None),  # outside 0-1
        ("-0.1", None),
        ("nan", None),
        ("", None),
    ],
)
def test_mmvet_score_parse(reply, expected):
    assert parse_correctness(reply) == expected


# ---------------------------------------------------------------- the cache, failures, flags


def test_cache_asks_nothing_twice_and_resumes(tmp_path, serve):
    calls = {"n": 0}

    def reply(request):
        calls["n"] += 1
        if calls["n"] == 3:
            return 500, b"upstream overloaded"
        return by_question(WILD_REPLIES)(request)

    judge = serve(reply)
    data = wild_dir(tmp_path)
    answers = write_jsonl(tmp_path / "answers.jsonl", [answer(q, f"model {q}") for q, *_ in WILD_QUESTIONS])
    with pytest.raises(JudgeError, match=f"the judge at {judge.url}/chat/completions answered HTTP 500"):
        score_answers("llava_bench_in_the_wild", data, answers, judge_url=judge.url, judge_model="j")
    cache = tmp_path / "answers.judge.jsonl"
    assert len(cache.read_text().splitlines()) == 2  # the two replies before the failure
    scores, _ = score_answers("llava_bench_in_the_wild", data, answers, judge_url=judge.url, judge_model="j")
    assert len(judge.requests) == 3 + 2 and scores["judge"]["requests"] == 2 and scores["judge"]["cached"] == 2
    again, _ = score_answers("llava_bench_in_the_wild", data, answers, judge_url=judge.url, judge_model="j")
    assert len(judge.requests) == 5 and again["judge"]["cached"] == 4
    assert (
        again["metrics"] == scores["metrics"] == {"relative_score": 0.769, "model_score": 0.5, "reference_score": 0.65}
    )
    # another judge model is another request: nothing cached for it
    score_answers("llava_bench_in_the_wild", data, answers, judge_url=judge.url, judge_model="other")
    assert len(judge.requests) == 9
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert rows[0]["request"]["model"] == "j" and rows[0]["reply"] == "8 6\nAssistant 1 names the dish."


@pytest.mark.parametrize(
    "status, body, message",
    [
        (500, b"internal error", "answered HTTP 500"),
        (200, b"<html>not json</html>", "answered something that is not JSON"),
        (200, b'{"error": "no such model"}', r"answered JSON without choices\[0\].message.content"),
    ],
)
def test_a_failing_endpoint_is_named(tmp_path, serve, status, body, message):
    judge = serve(lambda r: (status, body))
    answers = write_jsonl(tmp_path / "a.jsonl", [answer(0, "x = -1")])
    with pytest.raises(JudgeError, match=f"the judge at {judge.url}/chat/completions {message}"):
        score_answers("mmvet", mmvet_dir(tmp_path), answers, judge_url=judge.url, judge_model="j")


def test_an_unreachable_endpoint_is_named(tmp_path, serve):
    judge = serve(lambda r: "0.5")
    judge.close()  # nothing listens on its port now
    answers = write_jsonl(tmp_path / "a.jsonl", [answer(0, "x = -1")])
    with pytest.raises(JudgeError, match=f"the judge at {judge.url}/chat/completions could not be reached"):
        score_answers("mmvet", mmvet_dir(tmp_path), answers, judge_url=judge.url, judge_model="j")


def test_a_rate_limit_is_waited_out(serve):
    calls = []
    judge = serve(lambda r: (calls.append(1), (429, b"slow down") if len(calls) < 3 else "0.5")[1])
    client = JudgeClient(judge.url, "j", KEY, rate_limit_wait=0.0)
    assert client.complete({"model": "j", "messages": []}) == ("0.5", "j") and len(judge.requests) == 3


def test_the_key_comes_from_the_named_variable(tmp_path, serve, monkeypatch):
    judge = serve(lambda r: "0.5")
    data, answers = mmvet_dir(tmp_path), write_jsonl(tmp_path / "a.jsonl", [answer(0, "x = -1")])
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ConfigError, match="environment variable OPENAI_API_KEY is not set"):
        score_answers("mmvet", data, answers, judge_url=judge.url, judge_model="j")
    with pytest.raises(ConfigError, match="environment variable MY_JUDGE_KEY is not set"):
        score_answers("mmvet", data, answers, judge_url=judge.url, judge_model="j", judge_key_env="MY_JUDGE_KEY")
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-mine")
    score_answers("mmvet", data, answers, judge_url=judge.url, judge_model="j", judge_key_env="MY_JUDGE_KEY")
    assert judge.headers[-1]["Authorization"] == "Bearer sk-mine"


def test_judge_flags_are_needed_and_only_for_judged_benchmarks(tmp_path):
    data, answers = mmvet_dir(tmp_path), write_jsonl(tmp_path / "a.jsonl", [answer(0, "x")])
    with pytest.raises(ConfigError, match="mmvet is scored by a judge model: --judge-url and --judge-model needed"):
        score_answers("mmvet", data, answers)
    with pytest.raises(ConfigError, match="--judge-model needed"):
        score_answers("mmvet", data, answers, judge_url="http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="--judge-url: gqa is not scored by a judge model"):
        score_answers("gqa", tmp_path, answers, judge_url="http://127.0.0.1:9/v1")


def test_questions_for_eval_run(tmp_path):
    wild = BENCHMARKS.get("llava_bench_in_the_wild").questions(wild_dir(tmp_path))
    assert [(q.question_id, q.image, q.text) for q in wild[:1]] == [(0, "001.jpg", "What is the name of this dish?")]
    mmvet = BENCHMARKS.get("mmvet").questions(mmvet_dir(tmp_path))
    assert len(mmvet) == 5 and mmvet[0].image == "v1_0.png" and mmvet[0].text == "What is x?"
    assert all(BENCHMARKS.get(b).images == "images" for b in ("llava_bench_coco", "llava_bench_in_the_wild", "mmvet"))


def test_cli_eval_score_with_a_judge(tmp_path, serve):
    from typer.testing import CliRunner

    from tinylmm.cli.app import app

    judge = serve(lambda r: "0.5")
    data, answers = mmvet_dir(tmp_path), write_jsonl(tmp_path / "a.jsonl", [answer(q, "x") for q in range(5)])
    args = ["eval", "score", "--bench", "mmvet", "--data", str(data), "--answers", str(answers)]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert isinstance(result.exception, ConfigError) and "--judge-url and --judge-model needed" in str(result.exception)
    result = runner.invoke(
        app, [*args, "--judge-url", judge.url, "--judge-model", "j", "--out", str(tmp_path / "s.json")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s.json").read_text())["metrics"] == {"total": 0.5}
    assert (tmp_path / "s.judge.jsonl").is_file() and "5 request(s), 0 from" in result.output
    result = runner.invoke(
        app, [*args, "--judge-url", judge.url, "--judge-model", "j", "--out", str(tmp_path / "s.json")]
    )
    assert "0 request(s), 5 from" in result.output and len(judge.requests) == 5


@pytest.mark.parametrize("bench, expected", [("mmvet", 1024), ("llava_bench_in_the_wild", 1024), ("gqa", 128)])
def test_eval_run_generates_as_long_as_the_official_script(tmp_path, monkeypatch, bench, expected):
    """LLaVA's model_vqa.py (LLaVA-Bench, MM-Vet) generates up to 1024 tokens; the others' 128."""
    import tinylmm.api.commands as commands
    import tinylmm.eval.answering as answering
    from tinylmm.eval.answering import Question

    class Model:
        def eval(self):
            return self

    asked = {}
    monkeypatch.setattr(commands, "load", lambda path: (Model(), None))
    monkeypatch.setattr(answering, "answer_questions", lambda *a, **kw: asked.update(kw))
    monkeypatch.setattr(BENCHMARKS.get(bench), "questions", lambda data: [Question(0, None, "hi")])
    commands.answer_benchmark(tmp_path / "run" / "final", bench, tmp_path)
    assert asked["max_new_tokens"] == expected
    commands.answer_benchmark(tmp_path / "run" / "final", bench, tmp_path, max_new_tokens=7)
    assert asked["max_new_tokens"] == 7


def test_a_judge_that_does_not_answer_in_time_is_named(serve):
    import time

    judge = serve(lambda r: (time.sleep(1.0), "0.5")[1])
    client = JudgeClient(judge.url, "j", KEY, timeout=0.2)
    with pytest.raises(
        JudgeError, match=f"the judge at {judge.url}/chat/completions could not be reached: .*timed out"
    ):
        client.complete({"model": "j", "messages": []})
