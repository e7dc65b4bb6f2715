"""The model factory on tiny random models of the real architecture classes."""

import pytest
import torch

from tinylmm.config import ConfigError, ConnectorSpec, LLMSpec, ModelSpec, VisionSpec
from tinylmm.models.assemble import build_model, load
from tinylmm.models.connectors import CONNECTORS, build_connector
from tinylmm.models.loading import ModelNotFoundError
from tinylmm.models.vision import build_vision

from conftest import model_inputs

TOK = "builtin:toy"
LLMS = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "stablelm": dict(model_type="stablelm", num_key_value_heads=2),
    "phi": dict(model_type="phi", num_key_value_heads=2, partial_rotary_factor=0.5),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=1),
}
SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
CLIP = dict(SIGLIP, model_type="clip_vision_model")
# published at 40 px (5 x 5 patches), fed 24 px (3 x 3) as DINOv2-L at 518 is fed 224; a layer
# scale other than 1 so that a missing LayerScale would show
DINOV2 = dict(
    model_type="dinov2",
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=40,
    patch_size=8,
    layerscale_value=0.5,
)


def spec(llm="llama", vision=SIGLIP, connector="mlp2x_gelu", **conn):
    cfg = dict(
        vocab_size=520,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        **LLMS[llm],
    )
    return ModelSpec(
        llm=LLMSpec(config=cfg, tokenizer=TOK),
        vision=VisionSpec(config=dict(vision)),
        connector=ConnectorSpec(type=connector, **conn),
        template="llama",
    )


@pytest.mark.parametrize("vision, has_cls", [(SIGLIP, False), (CLIP, True)])
@pytest.mark.parametrize("layer", [-2, -1, 1])
def test_feature_layer_and_selection_match_full_tower(vision, has_cls, layer):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cls_cfg, cls_model = (CLIPVisionConfig, CLIPVisionModel) if has_cls else (SiglipVisionConfig, SiglipVisionModel)
    full = cls_model(cls_cfg(**{k: v for k, v in vision.items() if k != "model_type"})).eval()
    tower = build_vision(VisionSpec(config=dict(vision), feature_layer=layer, select="patch")).eval()
    # copy weights of the kept part of the full tower into the cut tower
    state = {k: v for k, v in full.state_dict().items() if k in tower.model.state_dict()}
    missing = tower.model.load_state_dict(state, strict=False)
    assert not [m for m in missing.missing_keys if "post_layernorm" not in m and "head" not in m]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = full(pixel_values=x, output_hidden_states=True).hidden_states[layer]
        got = tower(x)
    # CLIP's patch selection drops the CLS token; SigLIP has none and keeps all 16 patches
    assert got.shape[1] == 16 and tower.num_patches == 16
    torch.testing.assert_close(got, want[:, 1:] if has_cls else want)
    expected_layers = {-2: 2, -1: 3, 1: 1}[layer]
    assert len(tower.layers) == expected_layers


@pytest.mark.parametrize("layer", [-2, -1, 1])
@pytest.mark.parametrize("select", ["patch", "cls_patch"])
def test_dinov2_features_are_the_full_models_hidden_states_at_the_input_size(layer, select):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    full = Dinov2Model(Dinov2Config(**{k: v for k, v in DINOV2.items() if k != "model_type"})).eval()
    tower = build_vision(VisionSpec(config=dict(DINOV2), feature_layer=layer, select=select, image_size=24)).eval()
    # the cut tower is a part of the full model: the final layernorm and mask_token are gone
    dropped = {k for k in full.state_dict() if k not in tower.model.state_dict()}
    assert {"embeddings.mask_token", "layernorm.weight", "layernorm.bias"} <= dropped
    assert (
        tower.model.load_state_dict({k: v for k, v in full.state_dict().items() if k not in dropped}).missing_keys == []
    )
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        want = full(pixel_values=x, output_hidden_states=True).hidden_states[layer]
        got = tower(x)
    assert tower.image_size == 24 and len(tower.layers) == {-2: 2, -1: 3, 1: 1}[layer]
    assert got.shape[1] == tower.num_patches == (9 if select == "patch" else 10)
    torch.testing.assert_close(got, want[:, 1:] if select == "patch" else want)


def test_dinov2_every_parameter_gets_a_gradient_and_the_tower_saves_and_loads(tmp_path):
    from PIL import Image

    s = spec(vision=DINOV2)
    s.vision.image_size = 24
    model, proc = build_model(s)
    assert proc.image_processor.size == 24 and model.num_image_tokens == 9
    assert proc.image_processor.image_mean == [0.485, 0.456, 0.406]  # ImageNet's
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    enc = proc.encode([("human", "<image>\nWhat color?"), ("gpt", "red")], num_images=1)
    model(**model_inputs(proc, enc, img)).loss.backward()
    # cls_token, the position embeddings (through their interpolation), the layer scales: no
    # parameter of the tower idles (DDP's unused-parameter rule)
    idle = [n for n, p in model.vision.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert idle == []
    model.save(tmp_path / "ck", proc)
    again, proc2 = load(tmp_path / "ck")
    assert again.vision.image_size == 24 and proc2.image_processor.size == 24
    prompt = proc.prompt([("human", "<image>\nWhat color?")], [img])
    with torch.no_grad():
        torch.testing.assert_close(again(**prompt).logits, model.eval()(**prompt).logits)


@pytest.mark.parametrize(
    "vision, size, message",
    [
        (DINOV2, 20, "image_size=20 is not a multiple of the tower's patch size 8 \\(e.g. 16\\)"),
        (SIGLIP, 24, "a siglip_vision_model tower takes its own 32 px; only dinov2"),
    ],
)
def test_an_input_size_the_tower_cannot_take_is_a_clear_error(vision, size, message):
    with pytest.raises(ConfigError, match=message):
        build_vision(VisionSpec(config=dict(vision), image_size=size))


def test_clip_cls_patch_keeps_cls():
    tower = build_vision(VisionSpec(config=dict(CLIP), select="cls_patch"))
    assert tower(torch.randn(1, 3, 32, 32)).shape[1] == 17 == tower.num_patches


# small options for connectors whose defaults are real-size (tests/test_connectors_attention.py tests those)
SMALL = {
    "resampler": dict(num_queries=5, depth=2, num_heads=4),
    "d_abstractor": dict(num_queries=4, layers=1, heads=2, points=2, hidden_size=32, intermediate_size=32),
    "qformer": dict(num_queries=5, layers=2, heads=2, hidden_size=32, intermediate_size=32),
}


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_connectors(name):
    options = SMALL.get(name, {})
    conn = build_connector(ConnectorSpec(type=name, **options), 32, 64, num_patches=16)
    out = conn(torch.randn(2, 16, 32))
    assert out.shape == (2, conn.output_len(16), 64)
    if name in ("linear", "mlp2x_gelu", "resampler", "d_abstractor", "qformer"):  # the others: their own tests
        assert conn.output_len(16) == options.get("num_queries", 16)


def test_unknown_connector_suggests():
    with pytest.raises(ConfigError, match="did you mean 'resampler'"):
        build_connector(ConnectorSpec(type="resampeler"), 8, 8)


@pytest.mark.parametrize("llm", list(LLMS))
@pytest.mark.parametrize("connector", ["mlp2x_gelu", "resampler"])
def test_forward_backward_generate_save_load(llm, connector, tmp_path):
    from PIL import Image

    options = dict(num_queries=6, num_heads=4) if connector == "resampler" else {}
    model, proc = build_model(spec(llm, connector=connector, **options))
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    turns = [
        ("human", "<image>\nWhat color is the circle?"),
        ("gpt", "red"),
        ("human", "And the shape?"),
        ("gpt", "circle"),
    ]
    enc = proc.encode(turns, num_images=1)
    assert enc.input_ids.count(model.image_token_id) == model.num_image_tokens
    batch = model_inputs(proc, enc, img)
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.connector.parameters().__next__().grad is not None
    assert out.num_tokens == sum(1 for x in enc.labels[1:] if x != -100)

    model.eval()
    prompt = proc.prompt([("human", "<image>\nWhat color is the circle?")], [img])
    cached = model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, use_cache=True)
    uncached = model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, use_cache=False)
    assert cached.shape == (1, 6)
    torch.testing.assert_close(cached, uncached)  # the KV cache path agrees with recomputation

    model.save(tmp_path / "ck", proc)
    again, proc2 = load(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(again(**prompt).logits, model(**prompt).logits)
    assert proc2.num_image_tokens == proc.num_image_tokens


def test_text_only_sample_and_mixed_batch():
    from tinylmm.data.processor import collate

    model, proc = build_model(spec())
    a = proc.encode([("human", "<image>\nhi"), ("gpt", "red")], num_images=1)
    b = proc.encode([("human", "just text"), ("gpt", "blue")], num_images=0)
    batch = collate([b, a], [torch.zeros(3, 32, 32)], proc.tokenizer.pad_token_id)
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_missing_weights_fail_fast_with_the_name(tmp_path):
    import time

    s = ModelSpec(
        llm=LLMSpec(name_or_path="nobody/no-such-llm"), vision=VisionSpec(name_or_path=str(tmp_path / "nothere"))
    )
    t = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="nobody/no-such-llm") as err:
        build_model(s)
    assert time.perf_counter() - t < 10
    assert "HF_HUB_OFFLINE" in str(err.value) and "--local-dir" in str(err.value)


def test_streamed_answer_matches_the_returned_one():
    # The prompt ends in "ASSISTANT:" without a space, so the first answer token carries one.
    from tinylmm.models.generation import CallbackStreamer

    _, proc = build_model(spec())
    pieces = []
    streamer = CallbackStreamer(proc.tokenizer, pieces.append)
    streamer.put(torch.zeros(1, 0, dtype=torch.long))  # generate() sends the (empty) prompt first
    for i in proc.tokenizer(" red circle", add_special_tokens=False)["input_ids"]:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(pieces) == "red circle"


def test_loss_on_supervised_positions_equals_the_loss_over_all_logits():
    import torch.nn.functional as F
    from PIL import Image

    model, proc = build_model(spec())
    convs = [
        [("human", "<image>\nWhat color?"), ("gpt", "red")],
        [("human", "<image>\nHow many shapes are there in the picture?"), ("gpt", "three shapes")],
    ]
    encs = [proc.encode(c, num_images=1) for c in convs]
    n = max(len(e.input_ids) for e in encs)
    ids = torch.tensor([e.input_ids + [0] * (n - len(e.input_ids)) for e in encs])
    labels = torch.tensor([e.labels + [-100] * (n - len(e.labels)) for e in encs])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (n - len(e.input_ids)) for e in encs])
    pixels = torch.stack([proc.image_processor(Image.new("RGB", (32, 32)))] * 2)
    rows = []
    hook = model.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    model.loss_chunk = 3
    out = model(ids, mask, pixels, labels)
    hook.remove()
    full = model(ids, mask, pixels).logits
    want = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss_sum, want)
    # the head ran on the supervised positions only, 3 at a time
    assert sum(rows) == out.num_tokens == int((labels[:, 1:] != -100).sum()) and max(rows) == 3
