"""`tinylmm serve`: an OpenAI-compatible chat server and a chat page for one checkpoint
(app.py), its request parsing and refusals (requests.py) and the batched generation thread
(batcher.py). Needs the `serve` extra: pip install 'tinylmm[serve]'."""

from tinylmm.serve.app import DEFAULT_MAX_TOKENS, context_length, create_app
from tinylmm.serve.requests import RequestError, parse_chat_request

__all__ = ["DEFAULT_MAX_TOKENS", "RequestError", "context_length", "create_app", "parse_chat_request"]
