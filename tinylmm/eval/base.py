"""The benchmark registry. A benchmark is registered under its exact name and provides:

evaluate(model, processor, data, *, out, batch_size, max_new_tokens) -> summary
    answers its questions, scores them, writes the answers and scores to `out` (JSON)
    and returns the summary (at least `bench`, `n`, `accuracy`)
data_for(model_dir, processor) -> Path
    its data when none is given: the run's own, or where it is installed or made
"""

from __future__ import annotations

from tinylmm.registry import Registry

BENCHMARKS: Registry = Registry("benchmark")
