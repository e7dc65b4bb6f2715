"""tinylmm: small Large Multimodal Models, trained in stages on one consumer GPU.

    import tinylmm
    model, processor = tinylmm.load("runs/x/final")
    model, processor = tinylmm.build("toy", ["connector.type=linear"])

The library calls behind every command are in tinylmm.api. The heavy ML stack is imported
on first use, so `import tinylmm` (and the CLI) stay fast.
"""

__version__ = "0.1.0"


def load(path, **kwargs):
    """A checkpoint directory -> (model, processor). See `tinylmm.api.load`."""
    from tinylmm.api import load as _load

    return _load(path, **kwargs)


def build(preset: str = "toy", overrides=(), **kwargs):
    """A fresh (untrained) model + processor of a preset, with `key=value` model overrides.
    See `tinylmm.api.build`."""
    from tinylmm.api import build as _build

    return _build(preset, overrides, **kwargs)
