"""tinylmm: small Large Multimodal Models, trained in stages on one consumer GPU.

    import tinylmm
    model, processor = tinylmm.load("runs/x/final")

The heavy ML stack is imported on first use, so `import tinylmm` (and the CLI) stay fast.
"""

__version__ = "0.1.0"


def load(path, **kwargs):
    """A trained checkpoint directory -> (model, processor). See `tinylmm.models.lmm.load`."""
    from tinylmm.models.lmm import load as _load

    return _load(path, **kwargs)


def build(preset: str = "toy", overrides=(), **kwargs):
    """A fresh (untrained) model + processor from a preset, with `key=value` overrides."""
    from tinylmm.config import resolve
    from tinylmm.models.lmm import build_model

    cfg, _ = resolve(preset, "base", overrides)
    return build_model(cfg.model, **kwargs)
