"""Benchmarks, one registry entry each (base.py says what an entry provides)."""

from tinylmm.eval import shapes  # noqa: F401 - registers the shapes benchmark
from tinylmm.eval.base import BENCHMARKS

__all__ = ["BENCHMARKS"]
