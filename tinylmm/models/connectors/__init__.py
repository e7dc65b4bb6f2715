"""Connectors: vision features [B, N, Dv] -> visual tokens [B, M, Dl]. One file per
connector registers it (base.py says what a connector provides)."""

from tinylmm.models.connectors import d_abstractor, linear, mlp, qformer, resampler  # noqa: F401 - register their connectors
from tinylmm.models.connectors.base import CONNECTORS, NoOptions, build_connector, connector_options

__all__ = ["CONNECTORS", "NoOptions", "build_connector", "connector_options"]
