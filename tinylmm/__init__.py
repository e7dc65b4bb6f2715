"""tinylmm: small Large Multimodal Models, trained in stages on one consumer GPU.

    import tinylmm
    model, processor = tinylmm.load("runs/x/final")
    model, processor = tinylmm.build("toy", ["connector.type=linear"])
    tinylmm.generate(model, processor, ["<image>\nWhat is it?", "Hello"], [image, None])

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


def generate(model, processor, prompts, images=None, *, max_new_tokens=128, batch_size=8, use_cache=True, **kwargs):
    """Answers to `prompts` (strings with `<image>` where an image goes, or conversations),
    `images` one entry per prompt (an image, a list of images or None), in left-padded
    batches of `batch_size` with the KV cache; greedy unless kwargs (transformers' generation
    options) say otherwise. -> one string per prompt. See `tinylmm.models.generation.generate`."""
    from tinylmm.models.generation import generate as _generate

    return _generate(
        model,
        processor,
        prompts,
        images,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        use_cache=use_cache,
        **kwargs,
    )
