"""An OpenAI chat-completions request -> a tinylmm conversation, or a RequestError naming
the fault (the field, the message and part index) with the HTTP status and OpenAI's error
code.

What is read follows OpenAI's Chat Completions API: `messages` of `system` / `user` /
`assistant` roles whose `content` is a string or a list of `{"type": "text", "text"}` and
`{"type": "image_url", "image_url": {"url"}}` parts; `max_tokens` (or
`max_completion_tokens`), `temperature`, `top_p`, `stream`, `stream_options.include_usage`.
An image is read only from a base64 data URL (`data:image/png;base64,...`): the server never
fetches a URL nor opens a path a client names. Options that would change the answer and are
not implemented (`n` > 1, `stop`, `tools`, `response_format`, `logprobs` ...) are refused
rather than ignored. One difference: without `temperature` the answer is greedy (as `tinylmm
chat`), where OpenAI's default is 1.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from tinylmm.data.templates import IMAGE_TOKEN

MAX_PIXELS = 40_000_000  # decoded width x height: a small PNG can unpack to gigabytes
_DATA_URL = re.compile(r"data:(?P<mime>image/[A-Za-z0-9.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.S)
# Fields that change what is generated and are not implemented here: refused by name.
UNSUPPORTED = ("stop", "tools", "tool_choice", "functions", "function_call", "response_format", "logprobs")
UNSUPPORTED_IF_SET = {"n": 1, "top_logprobs": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0}


class RequestError(ValueError):
    """A request the server refuses: `status` (4xx), OpenAI's `code`, and the `param` at fault."""

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param

    def body(self) -> dict:
        """OpenAI's error object."""
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    turns: list[tuple[str, str]]  # (human|gpt, text), `<image>` where the image goes
    images: list[Image.Image]
    max_tokens: int | None  # None: what the context leaves, at most the server's default
    temperature: float  # 0: greedy
    top_p: float
    stream: bool
    include_usage: bool


def unknown_model(name, model_name: str) -> RequestError:
    return RequestError(
        f"the model '{name}' does not exist; this server serves '{model_name}' (GET /v1/models)",
        status=404,
        code="model_not_found",
        param="model",
    )


def parse_chat_request(body, *, model_name: str, max_image_bytes: int, require_image: bool) -> ChatRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model != model_name:
        raise unknown_model(model, model_name)
    for key in UNSUPPORTED:
        if body.get(key) not in (None, [], False):
            raise RequestError(f"'{key}' is not supported by this server", code="unsupported_parameter", param=key)
    for key, neutral in UNSUPPORTED_IF_SET.items():
        if body.get(key) not in (None, neutral):
            raise RequestError(
                f"'{key}' = {body[key]!r} is not supported by this server (only {neutral!r})",
                code="unsupported_parameter",
                param=key,
            )
    turns, images = _conversation(body.get("messages"), max_image_bytes)
    if require_image and not images:
        raise RequestError(
            "the conversation has no image, and this model answers about an image (it was trained on one "
            "image per conversation); send one as an image_url part with a base64 data URL "
            "(or start the server with --allow-text-only)",
            code="image_required",
            param="messages",
        )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise RequestError(f"'{param}' must be a positive integer, not {max_tokens!r}", param=param)
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)  # greedy unless asked: as `tinylmm chat`
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("'top_p' must be above 0", param="top_p")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, not {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    return ChatRequest(turns, images, max_tokens, temperature, top_p, stream, bool(options.get("include_usage")))


def _number(body, key, default, low, high) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"'{key}' must be a number from {low} to {high}, not {value!r}", param=key)
    return float(value)


def _conversation(messages, max_image_bytes):
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    turns, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if role == "system":
            raise RequestError(
                f"{where}: system messages are not supported (the model's template has its own system prompt)",
                code="unsupported_role",
                param=f"{where}.role",
            )
        if role not in ("user", "assistant"):
            raise RequestError(f"{where}: unknown role {role!r} (user or assistant)", param=f"{where}.role")
        text, found = _content(message.get("content"), where, role, max_image_bytes)
        images += found
        turns.append(("human" if role == "user" else "gpt", IMAGE_TOKEN * len(found) + "\n" + text if found else text))
    if len(images) > 1:
        raise RequestError(
            f"the conversation has {len(images)} images; the model takes one per conversation",
            code="too_many_images",
            param="messages",
        )
    if turns[-1][0] != "human":
        raise RequestError("the last message must be the user's", param=f"messages[{len(messages) - 1}].role")
    return turns, images


def _content(content, where, role, max_image_bytes):
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise RequestError(f"{at}: only user messages may carry an image", param=at)
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(decode_image(url, at, max_image_bytes))
        else:
            raise RequestError(f"{at}: a part is {{'type': 'text', 'text': ...}} or an image_url part", param=at)
    return "\n".join(texts), images


def decode_image(url, at: str, max_image_bytes: int) -> Image.Image:
    """A base64 data URL -> an RGB image; RequestError naming `at` for anything else."""
    match = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
    if match is None:
        raise RequestError(
            f"{at}: images are read only from base64 data URLs (data:image/png;base64,...); "
            "the server never fetches a URL or opens a path",
            code="invalid_image_url",
            param=at,
        )
    data = re.sub(r"\s+", "", match["data"])
    if len(data) * 3 // 4 > max_image_bytes + 2:  # before decoding it
        raise _too_large(at, len(data) * 3 // 4, max_image_bytes)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{at}: broken base64 in the data URL ({e})", code="invalid_base64", param=at) from None
    if len(raw) > max_image_bytes:
        raise _too_large(at, len(raw), max_image_bytes)
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > MAX_PIXELS:
            raise RequestError(
                f"{at}: the image is {image.width}x{image.height} pixels, over the limit of {MAX_PIXELS:,}",
                status=413,
                code="image_too_large",
                param=at,
            )
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise RequestError(
            f"{at}: the data URL holds no readable image ({e})", code="invalid_image", param=at
        ) from None


def _too_large(at, size, limit) -> RequestError:
    return RequestError(
        f"{at}: the image is {size:,} bytes, over the server's limit of {limit:,} bytes (--max-image-mb)",
        status=413,
        code="image_too_large",
        param=at,
    )
