"""The tokenized-dataset cache at LLaVA-665K's scale: build time, second start, resident memory.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/token_cache.py --samples 200000 --out bench/token_cache.json

Synthetic LLaVA-format data shaped like LLaVA-665K: 95% of the samples have one image, 5%
are text-only; 45% are a single short QA turn, 55% multi-turn (2-6 turns of 10-40-word
questions and answers). The images are 1,000 small PNGs that the samples share (every sample
still has its file checked). The toy tokenizer and the llama template, with 729 visual tokens
per image (SigLIP-so400m's 27 x 27 grid; the toy's own tower has 16).

Each measurement runs in a fresh process (`python bench/token_cache.py --child ...`):
- build: LlavaDataset on a cold cache with data.num_proc 1, then 2 (the wall time of the
  constructor: parse, tokenize, write);
- second start: the constructor again on the warm cache (hash the file, map, check the files);
- resident memory: RSS (anonymous and file-backed, from /proc/self/status) before the
  constructor and after reading every sample's tokens once, as an epoch of training does,
  per sample; beside it, the same samples held as the Python lists of `Processor.encode`
  (what LlavaDataset kept before the cache), measured on the first 20,000.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the a red blue green cube ball cone left right top bottom near far large small what where how many".split()


def sentence(rng, lo, hi) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_data(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    from PIL import Image

    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True)
    for k in range(1000):
        Image.new("RGB", (8, 8), (k % 255, 0, 0)).save(images / f"{k}.png")
    samples = []
    for i in range(n):
        turns = 1 if rng.random() < 0.45 else rng.randint(2, 6)
        conv = []
        for _ in range(turns):
            conv.append({"from": "human", "value": sentence(rng, 10, 40) + "?"})
            conv.append({"from": "gpt", "value": sentence(rng, 10, 40) + "."})
        sample = {"id": f"s{i}", "conversations": conv}
        if rng.random() < 0.95:
            sample["image"] = f"{rng.randrange(1000)}.png"
            conv[0]["value"] = "<image>\n" + conv[0]["value"]
        samples.append(sample)
    path = root / "data.json"
    path.write_text(json.dumps(samples))
    return path, images


def rss() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def child(args) -> dict:
    from tinylmm import api
    from tinylmm.data.llava import LlavaDataset
    from tinylmm.models.assemble import build_processor

    cfg, _ = api.resolve_config("toy", "share")
    processor = build_processor(cfg.model)
    processor.num_image_tokens = 729  # SigLIP-so400m's grid
    template = processor.get_template("llama")
    before = rss()
    t0 = time.perf_counter()
    ds = LlavaDataset(args.data, args.images, processor, template, 4096, num_proc=args.num_proc)
    start = time.perf_counter() - t0
    out = {"num_proc": args.num_proc, "built": ds.built, "constructor_s": round(start, 2), "samples": len(ds)}
    if args.read:
        t0 = time.perf_counter()
        tokens = 0
        for i in range(len(ds)):
            tokens += len(ds.encoded(i).input_ids)
        out["read_all_s"] = round(time.perf_counter() - t0, 2)
        after = rss()
        out["tokens_per_sample"] = round(tokens / len(ds), 1)
        out["resident_bytes_per_sample"] = {k: round((after[k] - before[k]) / len(ds), 1) for k in after}
        if args.lists:
            n = min(len(ds), 20000)
            base = rss()
            held = [ds.encoded(i) for i in range(n)]
            grown = rss()
            out["python_lists_bytes_per_sample"] = round((grown["RssAnon"] - base["RssAnon"]) / n, 1)
            del held
    return out


def run_child(data, images, cache, num_proc, read=False, lists=False) -> dict:
    cmd = [sys.executable, __file__, "--child", "--data", str(data), "--images", str(images)]
    cmd += ["--num-proc", str(num_proc)] + (["--read"] if read else []) + (["--lists"] if lists else [])
    env = dict(os.environ, TINYLMM_CACHE=str(cache))
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--data", type=Path)
    ap.add_argument("--images", type=Path)
    ap.add_argument("--num-proc", type=int, default=1)
    ap.add_argument("--read", action="store_true")
    ap.add_argument("--lists", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        data, images = write_data(tmp, args.samples)
        results = {"samples": args.samples, "data_mb": round(data.stat().st_size / 2**20, 1)}
        results["write_data_s"] = round(time.perf_counter() - t0, 1)
        results["build"] = [run_child(data, images, tmp / f"cold{n}", n) for n in (1, 2)]
        results["second_start"] = [run_child(data, images, tmp / "cold1", 1) for _ in range(3)]
        results["memory"] = run_child(data, images, tmp / "cold1", 1, read=True, lists=True)
        cache = next((tmp / "cold1" / "tokenized").iterdir())
        results["cache_mb"] = round(sum(p.stat().st_size for p in cache.iterdir()) / 2**20, 1)
    results["machine"] = f"{os.cpu_count()} CPUs, {os.uname().machine}, python {sys.version.split()[0]}"
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
