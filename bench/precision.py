"""Training-step time of the toy preset on this machine: fp32 vs bf16 autocast.

    python bench/precision.py [--steps 8] [--batch 16] [--seq 150]

Prints the median step time (forward + backward + AdamW) per precision. Results and the
machine they were measured on are recorded in bench/README.md.
"""

import argparse
import statistics
import time

import torch

from tinylmm.config import resolve
from tinylmm.models.assemble import build_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=150)
    args = ap.parse_args()
    cfg, _ = resolve("toy", "share")
    model, proc = build_model(cfg.model)
    n_img = model.num_image_tokens
    ids = torch.randint(4, 480, (args.batch, args.seq))
    ids[:, 5 : 5 + n_img] = model.image_token_id
    pixels = torch.randn(args.batch, 3, proc.image_processor.size, proc.image_processor.size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for name, enabled in (("fp32", False), ("bf16 autocast", True)):
        times = []
        for _ in range(args.steps + 1):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                out = model(ids, torch.ones_like(ids), pixels, ids.clone())
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
        print(
            f"{name:14s} median step {statistics.median(times[1:]):.3f} s  "
            f"(batch {args.batch} x seq {args.seq}, {torch.get_num_threads()} threads)"
        )


if __name__ == "__main__":
    main()
