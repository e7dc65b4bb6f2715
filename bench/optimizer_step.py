"""Time torch AdamW's step, fused vs foreach vs for-loop, over the trainable parameters of
a stage, on the device at hand. The three run interleaved, in one process, on the same
gradients, so their figures compare within one run.

    python bench/optimizer_step.py                      # the toy's share stage
    python bench/optimizer_step.py --preset toy --stage finetune --steps 300
    python bench/optimizer_step.py --set model.llm.config=... # any config override
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinylmm.config import resolve  # noqa: E402
from tinylmm.train import measure  # noqa: E402
from tinylmm.trainability import param_groups  # noqa: E402

IMPLS = ("fused", "foreach", "forloop")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--recipe", default="share")
    ap.add_argument("--stage", default="share")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--set", action="append", default=[], help="a config override key=value")
    args = ap.parse_args()
    cfg, _ = resolve(args.preset, args.recipe, args.set)
    with tempfile.TemporaryDirectory() as tmp:
        model = measure.stage_model(cfg, args.stage, tmp, "fp32")
    groups = param_groups(model, cfg.stages[args.stage])
    params = [p for g in groups for p in g["params"]]
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opts = {}
    for impl in IMPLS:
        kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
        opts[impl] = torch.optim.AdamW([{**gr, "params": list(gr["params"])} for gr in groups], **kw)
    times = {impl: [] for impl in IMPLS}
    for step in range(args.steps + 10):
        for impl in IMPLS:  # interleaved: the machine's drift hits all three alike
            t0 = time.perf_counter()
            opts[impl].step()
            if step >= 10:  # the first steps allocate the states
                times[impl].append(time.perf_counter() - t0)
    n = sum(p.numel() for p in params)
    print(
        f"# AdamW step, {args.preset}/{args.stage}: {len(params)} tensors, {n:,} parameters, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.steps} steps each, interleaved\n"
    )
    print("| implementation | min ms | median ms | max ms |")
    print("| --- | ---: | ---: | ---: |")
    for impl in IMPLS:
        t = [x * 1e3 for x in times[impl]]
        print(f"| {impl} | {min(t):.2f} | {statistics.median(t):.2f} | {max(t):.2f} |")


if __name__ == "__main__":
    main()
