"""lmms-eval's entry point for tinylmm: the manifest of its chat model `tinylmm`.

How lmms-eval (0.7.x) finds plugin models: `lmms_eval/models/__init__.py` builds its model
registry (`ModelRegistryV2`) from the built-in models, then `load_entrypoint_manifests()` reads
the entry-point group `lmms_eval.models`, whose payload may be "ModelManifest, iterable of
ModelManifest, or callable returning one of those" (`lmms_eval/models/registry_v2.py`).
pyproject.toml's entry point names `manifest` here; lmms-eval imports the class
(tinylmm/api/lmms_eval_model.py) only when `--model tinylmm` asks for it.

This module imports no lmms-eval module at import time, and no model code at all: lmms-eval
loads every plugin's manifest while `lmms_eval.models` itself is being imported, and the
class's module imports lmms-eval modules that import `lmms_eval.models` (a cycle, were the
manifest in that module).
"""

from __future__ import annotations

MODEL_ID = "tinylmm"
CLASS_PATH = "tinylmm.api.lmms_eval_model.TinyLMMChat"


def manifest():
    """The entry point's payload: the model id and where its (chat) class is."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, chat_class_path=CLASS_PATH)
