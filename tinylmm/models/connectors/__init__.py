"""Connectors: vision features [B, N, Dv] -> visual tokens [B, M, Dl]. One file per
connector registers it (base.py says what a connector provides)."""

import tinylmm.models.connectors.c_abstractor  # noqa: F401 - registers c_abstractor
import tinylmm.models.connectors.d_abstractor  # noqa: F401 - registers d_abstractor
import tinylmm.models.connectors.ldpv2  # noqa: F401 - registers ldpv2
import tinylmm.models.connectors.pixel_shuffle  # noqa: F401 - registers pixel_shuffle
import tinylmm.models.connectors.qformer  # noqa: F401 - registers qformer
from tinylmm.models.connectors import linear, mlp, resampler  # noqa: F401 - register their connectors
from tinylmm.models.connectors.base import CONNECTORS, NoOptions, build_connector, connector_options

__all__ = ["CONNECTORS", "NoOptions", "build_connector", "connector_options"]
