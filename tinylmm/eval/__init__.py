"""Benchmarks, one registry entry each (base.py says what an entry provides)."""

from tinylmm.eval import gqa, mme, mmmu, pope, scienceqa, shapes, textvqa  # noqa: F401 - each module registers its benchmark
from tinylmm.eval.base import BENCHMARKS

__all__ = ["BENCHMARKS"]
