"""Useful-token fractions with and without packing and length grouping (issue 14, item 7).

    python bench/packing.py                 # the toy's data and the LLaVA-665K-like lengths
    python bench/packing.py --samples 20000 --seed 0 --time 20   # and time toy micro-batches

For each data set and setting, one epoch of the loop's own data order
(`tinylmm.train.schedule.step_indices` / `micro_batches`, with or without
`tinylmm.train.grouping.ModalityLengthGrouping`) is cut into the stage's micro-batches, and
each micro-batch is collated as the loop collates it: right-padded (`collate`) or packed
in one row (`collate_packed`). useful = real tokens / positions computed (padding
included), summed over the epoch, counted by `tinylmm.data.packing.token_counts` on the
collated tensors.

The attention columns are arithmetic, not timings: the scores an sdpa or eager kernel
computes relative to the causal scores the samples need (sum of L^2 / 2). transformers 5.24
(`masking_utils._ignore_causal_mask_sdpa`) lets sdpa run its causal kernel (rows x Lmax^2 / 2)
only when no position is padding; otherwise, and always for a packed row (a block-diagonal
mask), the mask is dense and the whole square is computed: rows x Lmax^2, or (sum of L)^2.
flash-attention-2 (GPU) computes only each sample's causal triangle: 1.0.

The toy data is the toy preset's shapes world at its own stage settings (micro-batches of
16 and 8, max_len 256, 16 visual tokens). The LLaVA-665K-like lengths are synthetic,
shaped by `llava_665k_like` below; they are not read from the real file.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinylmm.data.packing import collate_packed, token_counts  # noqa: E402
from tinylmm.data.processor import Encoded, collate  # noqa: E402
from tinylmm.schema import StageConfig  # noqa: E402
from tinylmm.train.grouping import ModalityLengthGrouping  # noqa: E402
from tinylmm.train.schedule import micro_batches, stage_steps, step_indices  # noqa: E402

VISUAL_TOKENS = 576  # CLIP ViT-L/14-336 patches, LLaVA-1.5's tower


def llava_665k_like(n: int, seed: int) -> list[int]:
    """Signed token lengths (negative: text-only) shaped like LLaVA-1.5's mix665k:
    6.1% text-only ShareGPT conversations (40,688 of 665,298), log-normal around 700 tokens;
    the rest one image (576 visual tokens) plus text: 45% short single-turn VQA / captions
    (log-normal around 60 tokens), 55% multi-turn (merged VQA turns, LLaVA-Instruct
    conversations: log-normal around 250 tokens). Capped at max_len 2048."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.rand(n, generator=g)
    normal = torch.randn(n, generator=g)
    text_only = kind < 0.061
    short = (kind >= 0.061) & (kind < 0.061 + 0.45 * 0.939)
    median = torch.where(text_only, 700.0, torch.where(short, 60.0, 250.0))
    sigma = torch.where(text_only, 0.8, torch.where(short, 0.5, 0.6))
    text = (median * torch.exp(sigma * normal)).round().clamp(min=8)
    total = torch.where(text_only, text, text + VISUAL_TOKENS).clamp(max=2048).long()
    return torch.where(text_only, -total, total).tolist()


def toy_lengths(tmp: Path) -> dict[str, tuple[list[Encoded], StageConfig]]:
    """The toy preset's caption and instruct data, tokenized as its run tokenizes them."""
    from tinylmm.config import resolve
    from tinylmm.data.llava import LlavaDataset
    from tinylmm.data.shapes import write_shapes_dataset
    from tinylmm.models.assemble import build_model

    cfg, _ = resolve("toy", "share", [])
    _, proc = build_model(cfg.model)
    s = cfg.shapes
    paths = write_shapes_dataset(
        tmp, seed=s.seed, n_caption=s.n_caption, n_instruct=s.n_instruct, n_eval=1, n_pope=1,
        image_size=proc.image_processor.size,
    )  # fmt: skip
    out = {}
    for name, stage in cfg.stages.items():
        if name == "share":  # the same caption data and settings as pretrain
            continue
        template = proc.get_template(stage.template or cfg.model.template)
        data = LlavaDataset(paths[stage.data.shapes], paths["images"], proc, template, stage.max_len)
        encoded = [data.encoded(i) for i in range(len(data))]
        out[f"toy {name} ({stage.data.shapes}, {len(data)} samples)"] = (encoded, stage)
    return out


def time_toy_steps(tmp: Path, reps: int) -> None:
    """Forward + backward of the toy finetune stage's first micro-batches (8 samples), padded
    and packed, on this machine (fp32, the toy's full model trained): median seconds."""
    import statistics
    import time

    from tinylmm.config import resolve
    from tinylmm.data.llava import LlavaDataset
    from tinylmm.data.packing import collate_packed_items
    from tinylmm.data.shapes import write_shapes_dataset
    from tinylmm.models.assemble import build_model

    cfg, _ = resolve("toy", "share", [])
    model, proc = build_model(cfg.model, attn_implementation="sdpa")
    stage = cfg.stages["finetune"]
    paths = write_shapes_dataset(tmp, seed=0, n_caption=1, n_instruct=8 * reps, n_eval=1, n_pope=1,
                                 image_size=proc.image_processor.size)  # fmt: skip
    data = LlavaDataset(paths["instruct"], paths["images"], proc, proc.template, stage.max_len)
    model.train()
    for name, fn in (("padded", data.collate), ("packed", collate_packed_items)):
        times = []
        for r in range(reps):
            batch = fn([data[i] for i in range(8 * r, 8 * r + 8)])
            t0 = time.perf_counter()
            model(**batch).loss_sum.backward()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        print(f"toy finetune micro-batch of 8, {name}: median {statistics.median(times) * 1000:.1f} ms "
              f"forward + backward ({reps} micro-batches, {model.llm.config._attn_implementation})")  # fmt: skip


def synthetic_encoded(lengths: list[int]) -> list[Encoded]:
    return [Encoded([5] * abs(n), [-100] * abs(n), 1 if n > 0 else 0) for n in lengths]


def measure(encoded: list[Encoded], stage: StageConfig, grouped: bool, packed: bool) -> dict:
    steps = stage_steps(stage, len(encoded), 1, "bench")
    lengths = [len(e.input_ids) * (1 if e.num_images else -1) for e in encoded]
    grouping = ModalityLengthGrouping(lengths) if grouped else None
    useful = positions = computed = needed = 0
    for step in range(steps.steps_per_epoch):
        for mb in micro_batches(steps, step_indices(steps, step, 0, grouping), 0):
            items = [encoded[i] for i in mb]
            batch = collate_packed(items, []) if packed else collate(items, [], 0)
            u, p = token_counts(batch)
            useful, positions = useful + u, positions + p
            sizes = [len(e.input_ids) for e in items]
            needed += sum(n * n for n in sizes) / 2
            rows, width = batch["input_ids"].shape
            # a mask (packing, or any padding) is dense: every score of the square is computed;
            # with neither, transformers lets sdpa run its causal kernel (the triangle)
            dense = packed or u < p
            computed += rows * width * width / (1 if dense else 2)
    return {"useful": useful / positions, "attention": computed / needed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=20000, help="LLaVA-665K-like samples drawn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time", type=int, default=0, metavar="REPS", help="also time REPS toy micro-batches")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.time:
            time_toy_steps(Path(tmp) / "time", args.time)
        sets = toy_lengths(Path(tmp) / "shapes")
    synthetic = synthetic_encoded(llava_665k_like(args.samples, args.seed))
    for micro in (4, 16):
        stage = StageConfig(batch_size=128, micro_batch_size=micro, max_len=2048)
        sets[f"LLaVA-665K-like ({args.samples} samples), batch 128, micro-batch {micro}"] = (synthetic, stage)
    print("| data | micro-batch | order | useful, padded | useful, packed | attention computed / needed: "
          "padded | packed (sdpa/eager) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, (encoded, stage) in sets.items():
        for grouped in (False, True):
            pad = measure(encoded, stage, grouped, packed=False)
            pack = measure(encoded, stage, grouped, packed=True)
            order = "group_by_modality_length" if grouped else "shuffle"
            print(
                f"| {name} | {stage.micro_batch_size} | {order} | {pad['useful']:.1%} | {pack['useful']:.1%} | "
                f"{pad['attention']:.2f} | {pack['attention']:.2f} |"
            )


if __name__ == "__main__":
    main()
