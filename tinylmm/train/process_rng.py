"""Every process's RNG state in a step checkpoint, so a resumed multi-process run draws
what the uninterrupted one would have drawn.

Under DDP each process draws its own random numbers (LoRA's dropout masks are as big as its
own micro-batches, so the processes' generators drift apart after the first step). A
checkpoint holding only the main process's state would hand it to every process on resume,
and the resumed losses would differ (measured: finetune step 3 of tests/test_engines.py's
lora run, 6.221468 against 6.221303). Gathered with accelerate's `gather_object` (pickled
in memory between the run's own processes; the file stays pickle-free).
"""

from __future__ import annotations

from tinylmm.train import checkpoint as ckpt


def gather(accel) -> list[dict]:
    """Collective: every process calls it. The processes' RNG states, in process order."""
    from accelerate.utils import gather_object

    return list(gather_object([ckpt.rng_state()]))


def restore(saved, process_index: int) -> None:
    """Set this process's RNG state from a checkpoint's: its own entry, or the first one when
    the run resumes with more processes than wrote it (or from a single saved state)."""
    if isinstance(saved, dict):  # one state for all processes (a checkpoint before this module)
        saved = [saved]
    ckpt.set_rng_state(saved[process_index] if process_index < len(saved) else saved[0])
