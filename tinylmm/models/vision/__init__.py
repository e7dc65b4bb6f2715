"""Vision towers, by backend: transformers' CLIP / SigLIP / DINOv2 (hf.py) and open_clip's
ViTs (openclip.py). base.py says what a backend and a tower provide; one file per backend
registers it."""

from tinylmm.models.vision import hf, openclip  # noqa: F401 - register their backends
from tinylmm.models.vision.base import VISION_BACKENDS, backend_of
from tinylmm.schema import VisionSpec


def build_vision(spec: VisionSpec, *, dtype=None, device=None, attn_implementation: str = "sdpa"):
    """The tower of `spec`, cut at its feature layer, built by its backend."""
    return backend_of(spec).build(spec, device=device, dtype=dtype, attn_implementation=attn_implementation)


__all__ = ["VISION_BACKENDS", "backend_of", "build_vision"]
