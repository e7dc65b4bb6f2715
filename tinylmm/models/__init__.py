"""The model: vision tower -> connector -> LLM (lmm.py), put together in one place
(assemble.py) and saved in one format (checkpoint.py). Connectors and vision backends are
registries (connectors/, vision/)."""

from tinylmm.models.assemble import assemble, build_model, image_processor_for, load
from tinylmm.models.lmm import LMMOutput, TinyLMM

__all__ = ["LMMOutput", "TinyLMM", "assemble", "build_model", "image_processor_for", "load"]
