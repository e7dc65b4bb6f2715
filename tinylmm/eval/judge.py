"""A judge model behind any OpenAI-compatible chat-completions endpoint, its replies cached.

The judge-scored benchmarks (LLaVA-Bench COCO and In-the-Wild, MM-Vet) send one chat
completion per question, as their official scripts do with the openai client:
    POST {url}/chat/completions   {"model", "messages", "temperature", "max_tokens"}
    Authorization: Bearer <key>   the reply's text is choices[0].message.content
`url` is the API's base (e.g. https://api.openai.com/v1, or a local vLLM's http://host:8000/v1);
a url that already ends in /chat/completions is used as it is. The key is read from an
environment variable (OPENAI_API_KEY unless named otherwise), never from a flag.

Failures name the endpoint: one that cannot be reached, answers an HTTP error, or answers
something that is not a chat completion is a JudgeError. A rate limit (HTTP 429) is waited
out and the request sent again, a few times (LLaVA's scripts retry every error for ever every
0.5 s, MM-Vet's a RateLimitError every 30 s; an endpoint that keeps failing stops here instead).

Every reply is appended to a JSON-lines cache beside the scores, one line per request:
    {"key": sha256 of the request, "request": {...}, "reply": text, "model": the reply's model}
and flushed as it comes, so that scoring again sends nothing twice and an interrupted scoring
resumes where it stopped. A request is keyed by what is sent (model, messages, temperature,
max_tokens), not by the url: the same model behind another endpoint reuses the replies.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from functools import cache
from pathlib import Path

import yaml

from tinylmm.data.jsonl import read_jsonl
from tinylmm.errors import ConfigError
from tinylmm.eval.answering import mend_last_line

PROMPTS = Path(__file__).with_name("judge_prompts.yaml")
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
TIMEOUT_S = 120.0  # one completion; a judge writing LLaVA-Bench's 1024-token review takes a while
RATE_LIMIT_RETRIES = 5
RATE_LIMIT_WAIT_S = 2.0  # doubled on each retry, unless the endpoint's Retry-After says otherwise
SHOWN_BODY = 300  # characters of a bad reply quoted in an error


class JudgeError(ConfigError):
    """The judge endpoint failed or answered something that is not a chat completion."""


@cache
def prompts() -> dict:
    """The official judge prompts (judge_prompts.yaml: LLaVA's rule.json, MM-Vet's prompt)."""
    return yaml.safe_load(PROMPTS.read_text())


def endpoint_of(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def api_key(key_env: str) -> str:
    key = os.environ.get(key_env)
    if not key:
        raise ConfigError(
            f"the judge's API key: environment variable {key_env} is not set "
            "(--judge-key-env names another; for an endpoint without authentication set it to any value)"
        )
    return key


class JudgeClient:
    """One OpenAI-compatible chat-completions endpoint."""

    def __init__(self, url: str, model: str, key: str, *, timeout: float = TIMEOUT_S, rate_limit_wait=None):
        self.endpoint = endpoint_of(url)
        self.model = model
        self._key = key
        self.timeout = timeout
        self.rate_limit_wait = RATE_LIMIT_WAIT_S if rate_limit_wait is None else rate_limit_wait

    def complete(self, request: dict) -> tuple[str, str]:
        """(reply text, the reply's model) for one chat-completions request body."""
        body = json.dumps(request).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self._key}"}
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:
                text = e.read().decode(errors="replace")[:SHOWN_BODY]
                if e.code == 429 and attempt < RATE_LIMIT_RETRIES:
                    time.sleep(self._wait(e, attempt))
                    continue
                raise JudgeError(f"the judge at {self.endpoint} answered HTTP {e.code} {e.reason}: {text}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                raise JudgeError(f"the judge at {self.endpoint} could not be reached: {reason}") from None
        return self._content(raw)

    def _wait(self, error, attempt: int) -> float:
        after = error.headers.get("Retry-After") if error.headers else None
        try:
            return float(after)
        except (TypeError, ValueError):
            return self.rate_limit_wait * 2**attempt

    def _content(self, raw: bytes) -> tuple[str, str]:
        shown = raw[:SHOWN_BODY].decode(errors="replace")
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except json.JSONDecodeError:
            raise JudgeError(f"the judge at {self.endpoint} answered something that is not JSON: {shown!r}") from None
        except (KeyError, IndexError, TypeError):
            raise JudgeError(
                f"the judge at {self.endpoint} answered JSON without choices[0].message.content "
                f"(not an OpenAI chat completion): {shown}"
            ) from None
        if not isinstance(content, str):
            raise JudgeError(f"the judge at {self.endpoint} answered a message whose content is not text: {shown}")
        return content, str(reply.get("model", self.model))


def request_key(request: dict) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


class Judge:
    """A JudgeClient whose replies are cached in the JSON-lines file `cache`."""

    def __init__(self, client: JudgeClient, cache: Path):
        self.client = client
        self.cache = Path(cache)
        self.sent = 0  # requests that went to the endpoint
        self.cached = 0  # requests answered from the cache
        self._replies = {}
        if self.cache.exists():
            mend_last_line(self.cache)  # a line cut short by an interruption is asked again
            for row in read_jsonl(self.cache):
                if "key" in row and "reply" in row:
                    self._replies[row["key"]] = row["reply"]

    def ask(self, messages: list[dict], *, temperature: float, max_tokens: int) -> str:
        """The judge's reply to `messages`, from the cache when this request was sent before."""
        request = {"model": self.client.model, "messages": messages, "temperature": temperature}
        request["max_tokens"] = max_tokens
        key = request_key(request)
        if key in self._replies:
            self.cached += 1
            return self._replies[key]
        reply, model = self.client.complete(request)
        self.sent += 1
        self._replies[key] = reply
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        with self.cache.open("a") as f:
            f.write(json.dumps({"key": key, "request": request, "reply": reply, "model": model}) + "\n")
        return reply

    def report(self) -> dict:
        return {
            "url": self.client.endpoint,
            "model": self.client.model,
            "requests": self.sent,
            "cached": self.cached,
            "replies": str(self.cache),
        }


def judge_from_env(url: str, model: str, cache: Path, *, key_env: str = DEFAULT_KEY_ENV, **client_options) -> Judge:
    """A cached Judge for the endpoint `url` and `model`, its key read from `key_env`."""
    return Judge(JudgeClient(url, model, api_key(key_env), **client_options), cache)
