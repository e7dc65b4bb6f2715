"""A screenshot of `tinylmm serve`'s chat page answering about an image, for the README.

    python scripts/serve_screenshot.py RUN/final IMAGE "question" docs/serve-page.png

Serves the checkpoint on 127.0.0.1 (a free port), drives the page in headless Chromium
(Playwright on the system's chromium), asks the question about the image and saves the page
once the streamed answer is complete.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time

import uvicorn
from playwright.sync_api import sync_playwright

from tinylmm import api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("image")
    parser.add_argument("question")
    parser.add_argument("out")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium binary on PATH (Debian: apt-get install chromium)")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(api.serve_app(args.checkpoint), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 820, "height": 560})
        page.goto(f"http://127.0.0.1:{sock.getsockname()[1]}/")
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        page.set_input_files("#image-input", args.image)
        page.wait_for_function("document.getElementById('preview').style.display === 'block'")
        page.fill("#question", args.question)
        page.click("#send")
        page.wait_for_selector(".answer[data-done='true']", timeout=300_000)
        page.screenshot(path=args.out, full_page=True)
        print(f"{args.out}: the answer was {page.text_content('.answer')!r}")
        browser.close()
    server.should_exit = True


if __name__ == "__main__":
    main()
