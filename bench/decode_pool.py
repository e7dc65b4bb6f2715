"""Image decoding for `tinylmm data check` / `data.verify_images`: one process, a thread pool,
and the process pool tinylmm.data.check uses (fork), beside a "spawn" one, on COCO-sized
JPEGs (640 x 480, quality 90).

    python bench/decode_pool.py [--images 400] [--workers 2 4 8]

Prints a markdown table: images per second for each way and worker count (the pools'
start-up included, as `data check` pays it).
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from tinylmm.data.check import find_unreadable
from tinylmm.data.images import decode_error


def write_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(n):
        base = (np.stack([x * 255 / 640, y * 255 / 480, (x + y) * 255 / 1120], -1) + i * 7) % 256
        pixels = np.clip(base + rng.normal(0, 24, base.shape), 0, 255).astype(np.uint8)  # photo-like entropy
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        paths = write_images(Path(d), args.images)
        size = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        serial = timed(lambda: find_unreadable(paths, workers=1))
        print(f"{len(paths)} JPEGs 640x480, {size:.0f} KiB each")
        print("| way | workers | images/s |\n| --- | --- | --- |")
        print(f"| one process | 1 | {len(paths) / serial:.0f} |")
        for w in args.workers:

            def threads(w=w):
                with ThreadPoolExecutor(w) as pool:
                    assert not any(pool.map(decode_error, map(str, paths)))

            print(f"| threads | {w} | {len(paths) / timed(threads):.0f} |")

            def spawned(w=w):  # what "spawn" would cost: each worker imports this script again (torch ...)
                with ProcessPoolExecutor(w, mp_context=multiprocessing.get_context("spawn")) as pool:
                    assert not any(pool.map(decode_error, map(str, paths), chunksize=32))

            print(f"| processes (spawn) | {w} | {len(paths) / timed(spawned):.0f} |")
            print(f"| processes (fork) | {w} | {len(paths) / timed(lambda w=w: find_unreadable(paths, w)):.0f} |")


if __name__ == "__main__":
    main()
