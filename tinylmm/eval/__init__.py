"""Benchmarks, one registry entry each (base.py says what an entry provides)."""

from tinylmm.eval import (  # noqa: F401 - each module registers its benchmark
    gqa,
    llava_bench,
    mmbench,
    mme,
    mmmu,
    mmvet,
    pope,
    scienceqa,
    shapes,
    textvqa,
    vqav2,
)
from tinylmm.eval.base import BENCHMARKS

__all__ = ["BENCHMARKS"]
