"""Batched generation on the toy: generated tokens/s and time to first token at batch 1, 8
and 32, with and without the KV cache.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/generation.py [--repeats 5] [--new-tokens 32]
        [--threads 1] [--out bench/generation.json]

The model is `tinylmm.build("toy")` (the shipped pretrained LLM and tower, a connector drawn
with seed 0); each prompt is one user turn with one 64 x 64 image (16 visual tokens) and a
question of 4 to 14 words, so a batch is left-padded. Each row generates exactly
`--new-tokens` tokens (min_new_tokens = max_new_tokens, greedy) through
`tinylmm.models.generation.generate_tokens`, the call `tinylmm.generate`, eval and the server
use. The prompts are tokenized and their images preprocessed before the clock starts; the
time covers padding, the vision tower, the prefill and every decoding step.

    tokens/s  = batch x new tokens / wall time of the call
    TTFT      = call start -> the first token of every row exists (transformers calls the
                stopping criteria after each step; the first call marks it)
    decode/s  = batch x (new tokens - 1) / (wall - TTFT)

One warm-up call per setting, then --repeats timed calls; min and median are printed as a
markdown table and written to --out as JSON with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import StoppingCriteria, StoppingCriteriaList

import tinylmm
from tinylmm.models.generation import generate_tokens

COLORS = [(220, 30, 30), (30, 160, 40), (30, 60, 220), (230, 200, 20)]
QUESTIONS = [
    "What color is the circle?",
    "How many shapes are there?",
    "Is there a blue square in the image? Answer yes or no.",
    "Where is the red object?",
    "What shape is the green object in the top left corner of the picture?",
    "Describe the picture.",
    "Is the circle left of the square?",
    "Which shape is the largest one here, and what is its color?",
]


class FirstToken(StoppingCriteria):
    """Records when generate() has produced the first token of every row; never stops."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores, **kwargs):
        if self.at is None:
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def picture(i: int) -> Image.Image:
    im = Image.new("RGB", (64, 64), (245, 245, 245))
    draw = ImageDraw.Draw(im)
    x, y = 6 + (i * 13) % 30, 6 + (i * 7) % 30
    draw.ellipse((x, y, x + 24, y + 24), fill=COLORS[i % len(COLORS)])
    draw.rectangle((40 - x // 2, 36, 60 - x // 2, 56), fill=COLORS[(i + 1) % len(COLORS)])
    return im


def encoded_prompts(processor, n: int) -> list[dict]:
    return [processor.prompt([("human", f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}")], [picture(i)]) for i in range(n)]


def timed(model, processor, encoded, new_tokens: int, use_cache: bool) -> tuple[float, float]:
    first = FirstToken()
    start = time.perf_counter()
    out = generate_tokens(
        model,
        processor,
        encoded,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        use_cache=use_cache,
        stopping_criteria=StoppingCriteriaList([first]),
    )
    wall = time.perf_counter() - start
    assert out.shape == (len(encoded), new_tokens), out.shape
    return wall, first.at - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("generation.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, processor = tinylmm.build("toy")
    model.eval()
    load_before = os.getloadavg()
    results = []
    print("| batch | KV cache | tokens/s min / median | TTFT min / median | decode tokens/s median | wall median |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch in args.batches:
        encoded = encoded_prompts(processor, batch)
        lengths = [e["input_ids"].shape[1] for e in encoded]
        for use_cache in (True, False):
            timed(model, processor, encoded, args.new_tokens, use_cache)  # warm-up
            runs = [timed(model, processor, encoded, args.new_tokens, use_cache) for _ in range(args.repeats)]
            walls, ttfts = [w for w, _ in runs], [t for _, t in runs]
            rates = [batch * args.new_tokens / w for w in walls]
            decode = [batch * (args.new_tokens - 1) / (w - t) for w, t in runs]
            row = {
                "batch": batch,
                "use_cache": use_cache,
                "prompt_tokens": {"min": min(lengths), "max": max(lengths)},
                "new_tokens": args.new_tokens,
                "wall_s": walls,
                "ttft_s": ttfts,
                "tokens_per_s": {"min": min(rates), "median": statistics.median(rates), "max": max(rates)},
                "ttft_ms": {"min": 1000 * min(ttfts), "median": 1000 * statistics.median(ttfts)},
                "decode_tokens_per_s_median": statistics.median(decode),
            }
            results.append(row)
            print(
                f"| {batch} | {'yes' if use_cache else 'no'} | {row['tokens_per_s']['min']:.0f} / "
                f"{row['tokens_per_s']['median']:.0f} | {row['ttft_ms']['min']:.1f} / {row['ttft_ms']['median']:.1f} ms"
                f" | {row['decode_tokens_per_s_median']:.0f} | {statistics.median(walls):.3f} s |",
                flush=True,
            )
    report = {
        "command": "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/generation.py "
        f"--repeats {args.repeats} --new-tokens {args.new_tokens} --threads {args.threads}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_1_5_15_before": load_before,
            "load_average_1_5_15_after": os.getloadavg(),
        },
        "model": "tinylmm.build('toy'), seed 0",
        "repeats": args.repeats,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
