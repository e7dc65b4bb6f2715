"""The LM head + loss alone, at once vs in chunks: peak live tensor bytes over forward and
backward (op by op, tinylmm.train.measure.PeakTensorBytes) and wall time, on this CPU.

    python bench/head_loss.py                       # P=4096 positions, D=1024, V=32000, fp32
    python bench/head_loss.py --vocab 100352 --positions 2048 --chunks 0 1024 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinylmm.models.head_loss import head_loss_sum  # noqa: E402
from tinylmm.train.measure import PeakTensorBytes  # noqa: E402

MiB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 512])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-head", action="store_true", help="the head's weight trains too")
    args = ap.parse_args()
    torch.manual_seed(0)
    head = nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(args.train_head)
    hidden = torch.randn(args.positions, args.hidden, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.positions,))

    def once(chunk):
        loss = head_loss_sum(head, hidden, targets, chunk=chunk)
        loss.backward()
        hidden.grad = head.weight.grad = None
        return loss.detach()

    print(
        f"# LM head + loss: {args.positions} positions x {args.hidden} -> {args.vocab} vocabulary, fp32, "
        f"head {'trains' if args.train_head else 'frozen'}, {torch.get_num_threads()} threads, "
        f"{args.repeats} repeats, interleaved\n"
    )
    times = {c: [] for c in args.chunks}
    peaks = {}
    for c in args.chunks:
        tracker = PeakTensorBytes()
        tracker.track([hidden, targets, head.weight])
        base = tracker.now
        with tracker:
            once(c)
        peaks[c] = tracker.peak - base
    for _ in range(args.repeats):
        for c in args.chunks:  # interleaved: drift hits all alike
            t0 = time.perf_counter()
            once(c)
            times[c].append(time.perf_counter() - t0)
    print("| chunk | peak above inputs and weight | min s | median s |")
    print("| ---: | ---: | ---: | ---: |")
    for c in args.chunks:
        t = times[c]
        print(f"| {c or 'all at once'} | {peaks[c] / MiB:.1f} MiB | {min(t):.3f} | {statistics.median(t):.3f} |")


if __name__ == "__main__":
    main()
