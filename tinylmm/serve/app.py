"""The HTTP side of `tinylmm serve`: OpenAI's `/v1/chat/completions` and `/v1/models`, and a
chat page at `/`.

Shapes follow OpenAI's API reference: a completion is `{"id", "object": "chat.completion",
"created", "model", "choices": [{"index", "message", "finish_reason"}], "usage"}`; a stream is
server-sent events, one `data: {chat.completion.chunk}` per piece of text (the first delta
carries the role, the last the finish_reason; with `stream_options.include_usage` a final
chunk with empty `choices` carries the usage) and `data: [DONE]`; an error is
`{"error": {"message", "type", "param", "code"}}` with a 4xx status. Every refusal names the
field at fault, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tinylmm.data.processor import Processor, SampleError
from tinylmm.serve.batcher import Batcher, Job
from tinylmm.serve.requests import RequestError, parse_chat_request, unknown_model

PAGE = Path(__file__).with_name("page.html")
DEFAULT_MAX_TOKENS = 256  # a request that names no max_tokens gets at most this many


def context_length(model) -> int:
    """The LLM's context: its config's max_position_embeddings (or GPT-style n_positions)."""
    config = model.llm.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"the LLM's config ({type(config).__name__}) names no context length")


def create_app(
    model,
    processor: Processor,
    *,
    model_name: str,
    max_batch: int = 8,
    max_image_bytes: int = 10 * 2**20,
    require_image: bool = True,
) -> FastAPI:
    """A FastAPI app serving `model` as `model_name`; generation runs on one thread started
    with the app (its lifespan), batching up to `max_batch` requests."""
    lock = threading.Lock()  # the tokenizer: requests encode, the generation thread decodes
    batcher = Batcher(model, processor, max_batch=max_batch, lock=lock)
    ctx = context_length(model)
    max_body = max_image_bytes * 4 // 3 + 2**20  # one image in base64, and the text around it
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="tinylmm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.model_name = model_name

    @app.exception_handler(RequestError)
    async def refused(request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = "not_found" if e.status_code == 404 else "http_error"
        return JSONResponse(
            RequestError(f"{request.url.path}: {e.detail}", status=e.status_code, code=code).body(), e.status_code
        )

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "tinylmm"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != model_name:
            raise unknown_model(name, model_name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_json(request, max_body)
        req = parse_chat_request(
            body, model_name=model_name, max_image_bytes=max_image_bytes, require_image=require_image
        )
        with lock:
            try:
                inputs = processor.prompt(req.turns, req.images)
            except SampleError as e:
                raise RequestError(f"messages: {e}", code="invalid_conversation", param="messages") from None
        n = inputs["input_ids"].shape[1]
        max_tokens = req.max_tokens if req.max_tokens is not None else min(DEFAULT_MAX_TOKENS, ctx - n)
        if n + max(max_tokens, 1) > ctx:
            raise RequestError(
                f"this model's maximum context length is {ctx} tokens; the request needs {n + max_tokens} "
                f"({n} in the messages, image positions included, and {max_tokens} for the completion)",
                code="context_length_exceeded",
                param="messages",
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(
            inputs["input_ids"],
            inputs.get("pixel_values"),
            max_tokens,
            req.temperature,
            req.top_p,
            on_text=lambda text: loop.call_soon_threadsafe(events.put_nowait, ("text", text)),
            on_done=lambda *done: loop.call_soon_threadsafe(events.put_nowait, ("done", done)),
        )
        batcher.submit(job)
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        stamp = int(time.time())

        def usage(count):
            return {"prompt_tokens": n, "completion_tokens": count, "total_tokens": n + count}

        if not req.stream:
            pieces = []
            while True:
                kind, value = await events.get()
                if kind == "text":
                    pieces.append(value)
                    continue
                reason, count, error = value
                if error is not None:
                    return _server_error(error)
                return {
                    "id": reply_id,
                    "object": "chat.completion",
                    "created": stamp,
                    "model": model_name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(pieces)},
                            "finish_reason": reason,
                        }
                    ],
                    "usage": usage(count),
                }

        def chunk(delta, finish=None):
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {
                "id": reply_id,
                "object": "chat.completion.chunk",
                "created": stamp,
                "model": model_name,
                "choices": [choice],
            }

        async def stream():
            try:
                yield _event(chunk({"role": "assistant", "content": ""}))
                while True:
                    kind, value = await events.get()
                    if kind == "text":
                        yield _event(chunk({"content": value}))
                        continue
                    reason, count, error = value
                    if error is not None:
                        yield _event(json.loads(_server_error(error).body))
                    else:
                        yield _event(chunk({}, reason))
                        if req.include_usage:
                            yield _event({**chunk({}), "choices": [], "usage": usage(count)})
                    break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True  # the client went away mid-answer: its row stops (no-op when done)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _server_error(error: BaseException) -> JSONResponse:
    body = {
        "error": {
            "message": f"generation failed: {type(error).__name__}: {error}",
            "type": "server_error",
            "param": None,
            "code": "generation_failed",
        }
    }
    return JSONResponse(body, status_code=500)


async def _read_json(request: Request, max_body: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise RequestError(
            f"the request body is {int(declared):,} bytes, over the limit of {max_body:,}",
            status=413,
            code="request_too_large",
        )
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > max_body:
            raise RequestError(
                f"the request body is over the limit of {max_body:,} bytes", status=413, code="request_too_large"
            )
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not JSON ({e})", code="invalid_json") from None
