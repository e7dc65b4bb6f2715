"""`tinylmm serve` (issue 15): a server started here on 127.0.0.1 (a free port) on a tiny
random checkpoint, queried with the `openai` client, streaming and not; a burst of concurrent
requests, batched; the refusals (4xx JSON errors in OpenAI's shape, the server serving on);
the chat page, its HTML and, in headless Chromium with Playwright, driven end to end."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from PIL import Image, ImageDraw

from tinylmm import api
from tinylmm.errors import ConfigError

from conftest import TINY

openai = pytest.importorskip("openai", reason="the serve tests need the dev extra (pip install -e '.[dev]')")
uvicorn = pytest.importorskip("uvicorn", reason="tinylmm serve needs the serve extra (pip install -e '.[serve]')")
from tinylmm.serve import DEFAULT_MAX_TOKENS  # noqa: E402 - after the skip: it imports FastAPI

MODEL = [o for o in TINY if o.startswith("model.")]
MAX_IMAGE_MB = 0.05  # 52,428 bytes: a small PNG passes, a noisy 256x256 one does not


def png(size=32, noise=False) -> bytes:
    if noise:
        image = Image.frombytes("RGB", (size, size), os.urandom(size * size * 3))
    else:
        image = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(image).ellipse((4, 4, 20, 20), fill="red")
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def user(text, image: bytes | None = png()):
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"role": "user", "content": parts}


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model saved as a run's final checkpoint (TinyLMM.save)."""
    path = tmp_path_factory.mktemp("serve") / "tiny-run" / "final"
    model, processor = api.build("toy", MODEL)
    model.save(path, processor)
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    app = api.serve_app(checkpoint, max_batch=4, max_image_mb=MAX_IMAGE_MB)
    sock = free_socket()
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.05)
    assert uv.started, "the server did not start"
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield SimpleNamespace(url=url, app=app, client=client, name=app.state.model_name)
    uv.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The same checkpoint loaded in this process: what the model itself answers."""
    from tinylmm.models.generation import chat_reply

    model, processor = api.load(checkpoint)
    model.eval()

    def answer(question, max_new_tokens):
        turns = [("human", f"<image>\n{question}")]
        image = Image.open(io.BytesIO(png())).convert("RGB")
        reply = chat_reply(model, processor, turns, [image], max_new_tokens=max_new_tokens)
        return reply, processor.prompt(turns, [image])["input_ids"].shape[1]

    return answer


def ask(server, question, **kwargs):
    return server.client.chat.completions.create(
        model=server.name, messages=[user(question)], max_tokens=kwargs.pop("max_tokens", 8), **kwargs
    )


# ----------------------------------------------------------------------------- the API


def test_models_lists_the_checkpoint_by_its_run_name(server):
    assert server.name == "tiny-run/final"
    assert [m.id for m in server.client.models.list()] == [server.name]
    assert server.client.models.retrieve(server.name).owned_by == "tinylmm"


def test_a_completion_is_what_the_model_answers(server, reference):
    reply = ask(server, "What color is the circle?", max_tokens=8)
    expected, prompt_len = reference("What color is the circle?", 8)
    assert reply.object == "chat.completion" and reply.model == server.name
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip() == expected
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == prompt_len  # the 16 image positions included
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == prompt_len + reply.usage.completion_tokens


def test_streaming_sends_the_same_answer_in_chunks_then_done(server):
    plain = ask(server, "Describe the image.", max_tokens=12)
    stream = ask(server, "Describe the image.", max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_the_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": server.name, "messages": [user("Hi")], "max_tokens": 3, "stream": True}
    request = urllib.request.Request(
        server.url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_a_burst_of_concurrent_requests_all_succeed_batched(server):
    questions = [f"What is in the image? ({i})" for i in range(8)]
    alone = {q: ask(server, q, max_tokens=6).choices[0].message.content for q in questions[:2]}
    before = len(server.app.state.batcher.batch_sizes)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda q: ask(server, q, max_tokens=6), questions))
    assert len(replies) == 8 and all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert all(isinstance(r.choices[0].message.content, str) for r in replies)
    sizes = server.app.state.batcher.batch_sizes[before:]
    assert sum(sizes) == 8 and max(sizes) > 1 and max(sizes) <= 4  # batched, at most --max-batch
    # greedy answers do not depend on what they were batched with (left padding, masked)
    for q in questions[:2]:
        assert replies[questions.index(q)].choices[0].message.content == alone[q]


def test_a_client_that_goes_away_mid_stream_stops_its_generation(server):
    batcher = server.app.state.batcher
    # uninterrupted, this answer runs to its max_tokens (greedy: the same tokens every time)
    assert ask(server, "Tell me everything.", max_tokens=150).choices[0].finish_reason == "length"
    before = len(batcher.finish_reasons)
    body = {"model": server.name, "messages": [user("Tell me everything.")], "max_tokens": 150, "stream": True}
    request = urllib.request.Request(
        server.url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    response = urllib.request.urlopen(request, timeout=120)
    assert response.readline().startswith(b"data: ")  # the first chunk came
    response.close()  # ... and the client is gone
    for _ in range(2400):  # up to 2 min on a loaded machine (a CI run beside other work took over 30 s)
        if len(batcher.finish_reasons) > before:
            break
        time.sleep(0.05)
    assert batcher.finish_reasons[before:] == ["cancelled"]


# ----------------------------------------------------------------------------- refusals


def post(server, body: bytes | dict):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + "/v1/chat/completions", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def refusals():
    long_text = " ".join(["circle"] * 600)
    broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K!!!not-base64"}}
    not_image = {"type": "image_url", "image_url": {"url": data_url(b"plain text, not a picture")}}
    return [
        ("no image", {"messages": [user("What is it?", image=None)]}, 400, "image_required", "messages"),
        (
            "broken base64",
            {"messages": [{"role": "user", "content": [broken]}]},
            400,
            "invalid_base64",
            "messages[0].content[0]",
        ),
        (
            "not an image",
            {"messages": [{"role": "user", "content": [not_image]}]},
            400,
            "invalid_image",
            "messages[0].content[0]",
        ),
        (
            "image over the limit",
            {"messages": [user("Hi", image=png(256, noise=True))]},
            413,
            "image_too_large",
            "messages[0].content[0]",
        ),
        (
            "an http URL",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}],
                    }
                ]
            },
            400,
            "invalid_image_url",
            "messages[0].content[0]",
        ),
        (
            "a path",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
            400,
            "invalid_image_url",
            "messages[0].content[0]",
        ),
        ("unknown model", {"model": "gpt-4o", "messages": [user("Hi")]}, 404, "model_not_found", "model"),
        ("prompt over the context", {"messages": [user(long_text)]}, 400, "context_length_exceeded", "messages"),
        (
            "completion over the context",
            {"messages": [user("Hi")], "max_tokens": 5000},
            400,
            "context_length_exceeded",
            "messages",
        ),
        (
            "two images",
            {"messages": [user("a"), {"role": "assistant", "content": "b"}, user("c")]},
            400,
            "too_many_images",
            "messages",
        ),
        (
            "system message",
            {"messages": [{"role": "system", "content": "Be brief."}, user("Hi")]},
            400,
            "unsupported_role",
            "messages[0].role",
        ),
        ("n > 1", {"messages": [user("Hi")], "n": 2}, 400, "unsupported_parameter", "n"),
        ("stop", {"messages": [user("Hi")], "stop": ["."]}, 400, "unsupported_parameter", "stop"),
        (
            "ends with the assistant",
            {"messages": [user("Hi"), {"role": "assistant", "content": "Yo"}]},
            400,
            "invalid_request",
            "messages[1].role",
        ),
    ]


@pytest.mark.parametrize(("what", "body", "status", "code", "param"), refusals(), ids=[r[0] for r in refusals()])
def test_a_bad_request_is_a_4xx_error_naming_the_fault(server, what, body, status, code, param):
    got, reply = post(server, {"model": server.name, "max_tokens": 4, **body})
    assert got == status, reply
    error = reply["error"]
    assert error["code"] == code and error["param"] == param and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert ask(server, "Still there?", max_tokens=2).choices[0].message.content is not None  # serving on


def test_messages_name_what_is_wrong(server):
    _, reply = post(server, {"model": "gpt-4o", "messages": [user("Hi")]})
    assert "gpt-4o" in reply["error"]["message"] and server.name in reply["error"]["message"]
    _, reply = post(server, {"model": server.name, "messages": [user("Hi")], "max_tokens": 5000})
    assert "maximum context length is 512 tokens" in reply["error"]["message"]
    _, reply = post(server, {"model": server.name, "messages": [user("Hi", image=png(256, noise=True))]})
    assert "over the server's limit of 52,428 bytes" in reply["error"]["message"]
    _, reply = post(
        server,
        {
            "model": server.name,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}
            ],
        },
    )
    assert "never fetches a URL or opens a path" in reply["error"]["message"]


def test_the_openai_client_sees_the_refusals_as_its_errors(server):
    with pytest.raises(openai.NotFoundError, match="the model 'nope' does not exist") as e:
        server.client.chat.completions.create(model="nope", messages=[user("Hi")])
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError, match="no image") as e:
        server.client.chat.completions.create(model=server.name, messages=[user("Hi", image=None)])
    assert e.value.code == "image_required"


def test_a_body_that_is_not_json_and_an_unknown_path_get_json_errors(server):
    assert post(server, b"{not json")[0] == 400
    status, reply = post(server, b"{not json")
    assert reply["error"]["code"] == "invalid_json"
    try:
        urllib.request.urlopen(server.url + "/v1/completions", timeout=30)
        raise AssertionError("no 404")
    except urllib.error.HTTPError as e:
        assert e.code == 404 and json.loads(e.read())["error"]["code"] == "not_found"


def test_the_model_name_is_the_run_and_checkpoint_even_through_a_link(tmp_path):
    (tmp_path / "run" / "finetune" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final").symlink_to("finetune/final")  # as a run's final/ is
    assert api.serving.model_name(tmp_path / "run" / "final") == "run/final"
    assert api.serving.model_name(tmp_path / "run" / "step-40") == "run/step-40"
    assert api.serving.model_name(tmp_path / "merged-model") == "merged-model"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_a_loopback_host_is_said_to_be_this_machine_only(host):
    assert "only this machine can reach it" in api.serving.reach(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.org"])
def test_any_other_host_is_said_to_be_reachable_without_authentication(host):
    assert "other machines can reach it, and it has no authentication" in api.serving.reach(host)


def test_serve_app_refuses_bad_options(checkpoint):
    with pytest.raises(ConfigError, match="--max-batch must be at least 1"):
        api.serve_app(checkpoint, max_batch=0)
    with pytest.raises(ConfigError, match="--max-image-mb must be above 0"):
        api.serve_app(checkpoint, max_image_mb=0)


# ----------------------------------------------------------------------------- the page


def test_the_page_is_served_with_its_script(server):
    with urllib.request.urlopen(server.url + "/", timeout=30) as response:
        assert response.headers["content-type"].startswith("text/html")
        html = response.read().decode()
    for needle in (
        'id="image-input"',
        'id="question"',
        "/v1/chat/completions",
        "/v1/models",
        "stream: true",
        '"paste"',
        "readAsDataURL",
        "[DONE]",
    ):
        assert needle in html, needle


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on this machine (Debian: apt-get install chromium)")
def test_the_page_in_headless_chromium_streams_the_answer(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page test needs playwright (the dev extra)")
    image = tmp_path / "circle.png"
    image.write_bytes(png())
    # the page names no max_tokens: the server's default
    expected = ask(server, "What color is the circle?", max_tokens=DEFAULT_MAX_TOKENS).choices[0].message.content
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        assert page.text_content("#model") == server.name
        page.set_input_files("#image-input", str(image))
        page.wait_for_function("document.getElementById('preview').style.display === 'block'")
        page.fill("#question", "What color is the circle?")
        page.click("#send")
        page.wait_for_selector(".answer[data-done='true']", timeout=120_000)
        assert page.text_content(".answer") == expected
        # a second question without an image: the image stays in the conversation (the history)
        page.fill("#question", "And the background?")
        page.click("#send")
        page.wait_for_selector(".answer:nth-of-type(4)[data-done='true']", timeout=120_000)
        assert "error" not in (page.get_attribute(".answer:nth-of-type(4)", "class") or "")
        if os.environ.get("TINYLMM_SCREENSHOT"):
            page.screenshot(path=os.environ["TINYLMM_SCREENSHOT"], full_page=True)
        browser.close()


# ----------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_the_serve_command_binds_localhost_says_so_and_takes_its_options(checkpoint):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    cmd = [
        sys.executable,
        "-m",
        "tinylmm.cli.app",
        "serve",
        str(checkpoint),
        "--port",
        str(port),
        "--allow-text-only",
        "--max-batch",
        "2",
        "--max-image-mb",
        "0.01",
    ]
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        lines = [proc.stderr.readline() for _ in range(1)]
        while "serving" not in lines[-1] and lines[-1] and len(lines) < 50:  # library warnings may come first
            lines.append(proc.stderr.readline())
        said = lines[-1]
        assert f"at http://127.0.0.1:{port}" in said and "only this machine can reach it" in said, lines
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="tiny-run/final", messages=[user("Hi", image=None)], max_tokens=3)
        assert reply.choices[0].message.content is not None  # --allow-text-only: no image needed
        with pytest.raises(openai.APIStatusError, match="limit of 10,485 bytes") as e:  # --max-image-mb 0.01
            client.chat.completions.create(
                model="tiny-run/final", messages=[user("Hi", image=png(128, noise=True))], max_tokens=3
            )
        assert e.value.status_code == 413
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["no/such/dir"], "not a tinylmm checkpoint"), (["no/such/dir", "--max-batch", "0"], "--max-batch must be")],
)
def test_serve_user_errors_exit_2_with_one_line(args, message, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-m", "tinylmm.cli.app", "serve", *args], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
