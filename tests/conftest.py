import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup would otherwise hang ~30 s
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "TINYLMM_CACHE" not in os.environ:  # the tokenized-dataset cache: one per test session, never ~/.cache
    import tempfile

    os.environ["TINYLMM_CACHE"] = tempfile.mkdtemp(prefix="tinylmm-test-cache-")

import pytest  # noqa: E402

# A model and schedule small enough for end-to-end tests on a 2-core CPU (seconds).
TINY = [
    # random-init stand-ins of the toy's pretrained parts (builtin:toy-llm, builtin:toy-siglip)
    "model.llm.name_or_path=null",
    "model.llm.tokenizer=builtin:toy",
    "model.llm.config={model_type: llama, vocab_size: 512, hidden_size: 64, intermediate_size: 128,"
    " num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 512,"
    " tie_word_embeddings: true, bos_token_id: 1, eos_token_id: 2, pad_token_id: 3}",
    "model.vision.name_or_path=null",
    "model.vision.config={model_type: siglip_vision_model, hidden_size: 32, intermediate_size: 64,"
    " num_hidden_layers: 4, num_attention_heads: 2, image_size: 32, patch_size: 8}",
    # the recipes' cut (the toy's -3 suits its own pretrained tower): the tests' towers keep layers
    "model.vision.feature_layer=-2",
    "shapes.n_caption=48",
    "shapes.n_instruct=48",
    "shapes.n_eval=12",
    "shapes.n_pope=1",
    "eval.bench=[]",
]


def tiny_stages(recipe_stages=("pretrain", "share", "finetune"), steps=3, batch=8, micro=4):
    out = []
    for s in recipe_stages:
        out += [
            f"stages.{s}.max_steps={steps}",
            f"stages.{s}.batch_size={batch}",
            f"stages.{s}.micro_batch_size={micro}",
            f"stages.{s}.max_len=128",
        ]
    return out


def supervised_runs(ids, labels):
    """Contiguous runs of supervised token ids (labels != -100)."""
    runs, cur = [], []
    for i, label in zip(ids, labels):
        if label != -100:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + [cur] if cur else runs


def model_inputs(processor, encoded, image) -> dict:
    """The forward's keyword arguments for one encoded sample (`processor.encode`) and its image."""
    import torch

    ids = torch.tensor([encoded.input_ids])
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        labels=torch.tensor([encoded.labels]),
        pixel_values=processor.image_processor(image)[None],
    )


def require_openclip():
    """open_clip for the open_clip tests, or a skip of them saying why. CI runs with
    TINYLMM_REQUIRE_OPENCLIP=1 (.ci/run): there a missing open_clip fails the run."""
    try:
        import open_clip
    except ImportError as e:
        if os.environ.get("TINYLMM_REQUIRE_OPENCLIP") == "1":
            pytest.fail(f"TINYLMM_REQUIRE_OPENCLIP=1, but open_clip cannot be imported ({e})", pytrace=False)
        pytest.skip(
            f"open_clip cannot be imported ({e}); pip install 'tinylmm[openclip]' to run these tests",
            allow_module_level=True,
        )
    return open_clip


def is_openclip(spec) -> bool:
    """Whether a VisionSpec's tower comes from the open_clip backend."""
    return spec.backend == "open_clip"


def openclip_testable() -> bool:
    """Whether open_clip presets can be exercised here (under TINYLMM_REQUIRE_OPENCLIP=1 they
    always are, so a missing open_clip fails instead of shrinking the tests)."""
    import importlib.util

    return os.environ.get("TINYLMM_REQUIRE_OPENCLIP") == "1" or importlib.util.find_spec("open_clip") is not None


@pytest.fixture
def tiny_overrides():
    return TINY + tiny_stages()
