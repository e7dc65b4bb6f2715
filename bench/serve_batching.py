"""`tinylmm serve`: wall time of a burst of concurrent requests, batched or one at a time.

    python bench/serve_batching.py RUN/final IMAGE [--requests 8] [--max-tokens 32]

Serves the checkpoint in this process on 127.0.0.1 twice, with --max-batch 1 and with
--max-batch N (N = --requests), sends N requests at once with the openai client (the same
image, N different questions) and prints the wall time of the burst, the batch sizes the
server ran and the completion tokens per second.
"""

from __future__ import annotations

import argparse
import base64
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import uvicorn

from tinylmm import api

QUESTIONS = [
    "Describe the shapes in this picture.",
    "What color is the square?",
    "How many shapes are there?",
    "Give a short description.",
    "What is in the image?",
    "Where is the red square?",
    "Is there a green triangle?",
    "What shape is the red object?",
]


def burst(checkpoint, image_url, n, max_tokens, max_batch):
    app = api.serve_app(checkpoint, max_batch=max_batch)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="-", max_retries=0)

    def ask(question):
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]
        return client.chat.completions.create(
            model=app.state.model_name, messages=[{"role": "user", "content": content}], max_tokens=max_tokens
        )

    ask(QUESTIONS[0])  # warm-up
    app.state.batcher.batch_sizes.clear()
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(ask, [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]))
    wall = time.perf_counter() - start
    tokens = sum(r.usage.completion_tokens for r in replies)
    sizes = list(app.state.batcher.batch_sizes)
    server.should_exit = True
    thread.join()
    return wall, tokens, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("image")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with open(args.image, "rb") as f:
        image_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    print("| --max-batch | requests | wall | completion tokens | tokens/s | batches run |")
    print("| --- | --- | --- | --- | --- | --- |")
    for max_batch in (1, args.requests):
        wall, tokens, sizes = burst(args.checkpoint, image_url, args.requests, args.max_tokens, max_batch)
        print(f"| {max_batch} | {args.requests} | {wall:.2f} s | {tokens} | {tokens / wall:.0f} | {sizes} |")


if __name__ == "__main__":
    main()
