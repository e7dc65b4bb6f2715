"""The attention connectors: Honeybee's D-Abstractor (`d_abstractor`) and TinyLLaVA's
BLIP-2-style Q-Former (`qformer`). Shapes at the real towers' grids (on the meta device),
parameter counts against the arithmetic of their definitions, a training step through each,
and the planner's activation bytes against what torch saves for backward."""

import pytest
import torch

from tinylmm import memory as mem
from tinylmm.config import ConfigError, resolve
from tinylmm.models.connectors import build_connector, connector_options
from tinylmm.models.connectors.d_abstractor import KERNEL_NOTE, ms_deform_attn
from tinylmm.schema import ConnectorSpec
from tinylmm.train import measure

from conftest import TINY

# CLIP ViT-L/14-336 (24 x 24 patches, width 1024) and SigLIP-so400m/14-384 (27 x 27, 1152)
TOWERS = [(576, 1024), (729, 1152)]
SMALL_DABS = dict(num_queries=9, layers=2, heads=4, points=3, hidden_size=64, intermediate_size=96)
SMALL_QFORMER = dict(num_queries=6, layers=3, heads=4, hidden_size=64, intermediate_size=96)


def meta_connector(kind, vision_dim, num_patches, llm_dim=2048, **options):
    with torch.device("meta"):
        return build_connector(ConnectorSpec(kind, **options), vision_dim, llm_dim, num_patches=num_patches)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("N, Dv", TOWERS)
@pytest.mark.parametrize("M", [1, 64, 144, 256, 576, 729, 1024])  # any perfect square, fewer or more than N
def test_d_abstractor_shapes(N, Dv, M):
    conn = meta_connector("d_abstractor", Dv, N, num_queries=M, layers=1)
    assert conn.output_len(N) == M
    assert conn(torch.empty(2, N, Dv, device="meta")).shape == (2, M, 2048)


@pytest.mark.parametrize("N, Dv", TOWERS)
@pytest.mark.parametrize("M", [1, 64, 128, 150, 729])  # any M: the queries have no grid
def test_qformer_shapes(N, Dv, M):
    conn = meta_connector("qformer", Dv, N, num_queries=M, layers=2)
    assert conn.output_len(N) == M
    assert conn(torch.empty(2, N, Dv, device="meta")).shape == (2, M, 2048)


@pytest.mark.parametrize(
    "options, num_patches, message",
    [
        (dict(num_queries=150), 729, r"model.connector.num_queries=150: .*perfect square.*27 x 27; nearest: 144, 169"),
        (dict(num_queries=0), 576, r"model.connector.num_queries=0: .*perfect square.*24 x 24"),
        ({}, 600, r"model.connector.type=d_abstractor reads the patches as a square grid; the tower hands it 600"),
        (dict(heads=3), 576, r"model.connector.heads=3 does not divide model.connector.hidden_size=1024"),
        (dict(points=0), 576, r"model.connector.points=0: must be >= 1"),
    ],
)
def test_d_abstractor_refuses_what_it_cannot_build(options, num_patches, message):
    with pytest.raises(ConfigError, match=message):
        meta_connector("d_abstractor", 1024, num_patches, **options)


def test_qformer_refuses_bad_options_and_unknown_keys_suggest():
    with pytest.raises(ConfigError, match=r"model.connector.heads=5 does not divide model.connector.hidden_size=768"):
        meta_connector("qformer", 1024, 576, heads=5)
    with pytest.raises(ConfigError, match=r"model.connector.num_queries=0: must be >= 1"):
        meta_connector("qformer", 1024, 576, num_queries=0)
    with pytest.raises(ConfigError, match="did you mean 'num_queries'"):
        connector_options(ConnectorSpec("qformer", num_query=64))
    with pytest.raises(ConfigError, match="did you mean 'points'"):
        connector_options(ConnectorSpec("d_abstractor", point=4))


def test_the_model_gives_the_connector_the_towers_grid():
    cfg, _ = resolve("toy", "share", TINY + ["model.connector={type: d_abstractor, num_queries: 4, layers: 1}"])
    meta = mem.build_meta(cfg.model)
    assert meta.model.num_image_tokens == 4 and meta.connector.pos_emb.shape == (16, 1024)  # 4 x 4 patches


# --------------------------------------------------------------------------- parameter counts


def test_d_abstractor_parameter_count_by_hand():
    # Honeybee's d-abs.yaml on SigLIP-so400m (N = 729, Dv = 1152) into a 2048-wide LLM:
    # d = 1024, 6 layers, M = 144; DeformableDetrConfig's 8 heads, 4 points, 1 level, FFN 1024
    d, Dv, Dl, N, M, H, P, F = 1024, 1152, 2048, 729, 144, 8, 4, 1024
    input_proj = Dv * d + d  # 1,180,672
    pos_emb, query_embed, reference = N * d, M * d, M * 2  # 746,496; 147,456; 288
    self_attn = 4 * (d * d + d)  # q, k, v, o: 4,198,400
    cross = (d * H * P * 2 + H * P * 2) + (d * H * P + H * P) + 2 * (d * d + d)  # offsets, weights, value, out
    mlp = (d * F + F) + (F * d + d)
    layer = self_attn + cross + mlp + 3 * 2 * d  # + three LayerNorms: 8,501,344
    output_proj = d * Dl + Dl  # 2,099,200
    expected = input_proj + pos_emb + query_embed + reference + 6 * layer + output_proj
    assert expected == 55_182_176
    assert n_params(meta_connector("d_abstractor", Dv, N, Dl)) == expected
    # at the hidden width of the features and the LLM neither projection exists
    same = meta_connector("d_abstractor", 64, 16, 64, **SMALL_DABS)
    d, N, M, H, P, F = 64, 16, 9, 4, 3, 96
    layer = 4 * (d * d + d) + (d * H * P * 3 + H * P * 3) + 2 * (d * d + d) + (d * F + F) + (F * d + d) + 6 * d
    assert n_params(same) == N * d + M * d + M * 2 + 2 * layer


def test_qformer_parameter_count_by_hand():
    # TinyLLaVA's qformer: BERT-base's shape (h = 768, 12 layers, FFN 3072), cross-attention
    # in layers 0, 2, ..., 10 with keys and values from Dv = 1152; 128 queries; 2048-wide LLM.
    # No word or position embeddings, no embedding LayerNorm weights, no text feed-forward.
    h, Dv, Dl, M, F = 768, 1152, 2048, 128, 3072
    queries = M * h  # 98,304
    self_attn = 4 * (h * h + h) + 2 * h  # q, k, v, dense, LayerNorm: 2,363,904
    cross = 2 * (h * h + h) + 2 * (Dv * h + h) + 2 * h  # q, dense; k, v from the features: 2,953,728
    mlp = (h * F + F) + (F * h + h) + 2 * h  # 4,723,968
    projector = h * Dl + Dl  # 1,574,912
    expected = queries + 12 * (self_attn + mlp) + 6 * cross + projector
    assert expected == 104_450_048
    assert n_params(meta_connector("qformer", Dv, 729, Dl)) == expected
    # cross_attention_every: 3 -> layers 0, 3, 6, 9 cross-attend
    assert n_params(meta_connector("qformer", Dv, 729, Dl, cross_attention_every=3)) == expected - 2 * cross


# --------------------------------------------------------------------------- the options do what they say


@pytest.mark.parametrize("kind, options", [("d_abstractor", SMALL_DABS), ("qformer", SMALL_QFORMER)])
def test_heads_and_dropout_change_the_computation(kind, options):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    a = build_connector(ConnectorSpec(kind, **options, dropout=0.0), 32, 48, num_patches=16).eval()
    b = build_connector(ConnectorSpec(kind, **{**options, "heads": 2}, dropout=0.0), 32, 48, num_patches=16).eval()
    if kind == "qformer":  # the same weights, split into other heads
        b.load_state_dict(a.state_dict())
        assert b.layers[0].attention.heads == 2
    else:  # the offsets and weights are per head: their shapes differ, the rest is shared
        per_head = ("sampling_offsets", "attention_weights")
        shared = {k: v for k, v in a.state_dict().items() if not any(name in k for name in per_head)}
        b.load_state_dict(shared, strict=False)
    assert not torch.allclose(a(x), b(x))
    a.train()
    assert torch.equal(a(x), a(x))  # no dropout: training is deterministic
    c = build_connector(ConnectorSpec(kind, **options, dropout=0.5), 32, 48, num_patches=16)
    c.load_state_dict(a.state_dict())
    assert not torch.equal(c(x), c(x)) and torch.equal(c.eval()(x), a.eval()(x))


def test_deformable_attention_samples_the_grid_bilinearly():
    """One head, one point, weight 1: the output is the bilinear interpolation of the map at
    the location (pixel i's centre at (i + 0.5) / w), and zero off the map."""
    h, w, D = 3, 4, 2
    value = torch.arange(h * w * D, dtype=torch.float32).view(1, h * w, 1, D)  # row-major
    grid = value.view(h, w, D)
    locations = torch.tensor([[(0.5 + 0.5) / w, (1 + 0.5) / h], [1.0 / w, 1.0 / h], [1.5, 0.5]]).view(1, 3, 1, 1, 1, 2)
    out = ms_deform_attn(value, [(h, w)], locations, torch.ones(1, 3, 1, 1, 1))
    assert torch.allclose(out[0, 0], (grid[1, 0] + grid[1, 1]) / 2)  # halfway between two centres
    assert torch.allclose(out[0, 1], (grid[0, 0] + grid[0, 1] + grid[1, 0] + grid[1, 1]) / 4)
    assert torch.equal(out[0, 2], torch.zeros(D))


def test_reference_points_start_on_a_uniform_grid():
    conn = build_connector(ConnectorSpec("d_abstractor", num_queries=9, layers=1), 1152, 2048, num_patches=729)
    ref = conn.reference_points.detach()
    ticks = torch.tensor([0.5, 13.5, 26.5]) / 27  # from the first patch centre to the last, as Honeybee's
    assert torch.allclose(ref[:, 0], ticks.repeat(3)) and torch.allclose(ref[:, 1], ticks.repeat_interleave(3))
    assert conn.reference_points.requires_grad


# --------------------------------------------------------------------------- training through them


@pytest.mark.parametrize(
    "connector",
    [
        "{type: d_abstractor, num_queries: 9, layers: 2, heads: 4, points: 2, hidden_size: 32, intermediate_size: 48}",
        "{type: qformer, num_queries: 6, layers: 2, heads: 4, hidden_size: 32, intermediate_size: 48}",
    ],
)
def test_a_training_step_through_the_connector(connector, tmp_path):
    cfg, _ = resolve("toy", "share", TINY + [f"model.connector={connector}"])
    torch.manual_seed(0)
    model = measure.stage_model(cfg, "pretrain", tmp_path, "fp32")  # the connector trains alone
    batch = measure.make_batch(model, 2, 48)
    assert model.num_image_tokens == (9 if "d_abs" in connector else 6)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        params = dict(model.connector.named_parameters())
        missing = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
        # the last layer's self-attention v_proj gets a gradient only through the attention's
        # output; everything, the reference points and the sampling offsets included, learns
        assert not missing, missing
        assert all(torch.isfinite(p.grad).all() for p in params.values())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------- the planner against torch


@pytest.mark.parametrize("kind, options", [("d_abstractor", SMALL_DABS), ("qformer", SMALL_QFORMER)])
@pytest.mark.parametrize(
    "stage, precision, frozen",
    [
        ("pretrain", "fp32", False),  # frozen tower: the features need no gradient
        ("share", "fp32", False),  # the tower trains: they do
        ("share", "bf16", False),  # autocast: half copies of the inputs and the fp32 weights
        ("share", "fp32", True),  # a frozen connector the tower's gradients flow through
        ("share", "bf16", True),  # the same, its weights stored in bf16
    ],
)
def test_connector_activations_match_bytes_saved_for_backward(kind, options, stage, precision, frozen, tmp_path):
    spec = "{" + ", ".join([f"type: {kind}"] + [f"{k}: {v}" for k, v in options.items()]) + "}"
    extra = ["stages.share.tune.connector=frozen"] if frozen else []
    cfg, _ = resolve("toy", "share", [f"model.connector={spec}", f"train.precision={precision}", *extra])
    model = measure.stage_model(cfg, stage, tmp_path, precision)
    B, size = 3, model.vision.image_size
    with measure.autocast(precision), torch.no_grad():
        feats = model.vision(torch.randn(B, 3, size, size))  # the tower's output as it is (strided)
    feats.requires_grad_(any(p.requires_grad for p in model.vision.parameters()))
    with measure.SavedTensors(model.connector) as saved, measure.autocast(precision):
        _out = model.connector(feats)  # kept alive while the hooks count
    acts = mem.stage_activations(mem.build_meta(cfg.model), cfg, stage, seq_len=64, precision=precision, device="cpu")
    planned = acts.connector * B + acts.connector_fixed
    # The requirement is 5%; the trace follows the ops and holds 1% (the deformable
    # attention's 8-byte scale of the offsets is left out).
    assert saved.total > 0 and planned == pytest.approx(saved.total, rel=0.01), (planned, saved.total)
    assert (KERNEL_NOTE in acts.notes) == (kind == "d_abstractor")


@pytest.mark.parametrize("kind, options", [("d_abstractor", SMALL_DABS), ("qformer", SMALL_QFORMER)])
def test_whole_step_activations_with_the_connector_match(kind, options, tmp_path):
    spec = "{" + ", ".join([f"type: {kind}"] + [f"{k}: {v}" for k, v in options.items()]) + "}"
    cfg, _ = resolve("toy", "share", [f"model.connector={spec}"])
    model = measure.stage_model(cfg, "share", tmp_path, "fp32")
    batch = measure.make_batch(model, 2, 96)
    plain, ckpt = measure.measure_saved(model, batch, "fp32")
    acts = mem.stage_activations(
        mem.build_meta(cfg.model),
        cfg,
        "share",
        seq_len=96,
        precision="fp32",
        device="cpu",
        logit_positions=measure.logit_positions(batch),
    )
    assert sum(acts.saved(2, False).values()) == pytest.approx(plain, rel=0.01)
    assert sum(acts.saved(2, True).values()) == pytest.approx(ckpt, rel=0.01)
    plan = mem.plan_run(cfg, device="cpu")
    assert all((KERNEL_NOTE in s.notes) == (kind == "d_abstractor") for s in plan.stages)


@pytest.mark.parametrize(
    "connector",
    [
        "{type: d_abstractor, num_queries: 4, layers: 1, heads: 2, points: 2, hidden_size: 32, intermediate_size: 32}",
        "{type: qformer, num_queries: 5, layers: 2, heads: 2, hidden_size: 32, intermediate_size: 32}",
    ],
)
def test_save_load_and_generate(connector, tmp_path):
    from PIL import Image

    from tinylmm.models.assemble import build_model, load

    cfg, _ = resolve("toy", "share", TINY + [f"model.connector={connector}"])
    model, proc = build_model(cfg.model)
    model.eval()
    prompt = proc.prompt([("human", "<image>\nWhat is there?")], [Image.new("RGB", (40, 30), (200, 10, 10))])
    assert model.generate(**prompt, max_new_tokens=3, min_new_tokens=3).shape == (1, 3)
    model.save(tmp_path / "ck", proc)
    again, _ = load(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(again(**prompt).logits, model(**prompt).logits)


@pytest.mark.parametrize("kind, options", [("d_abstractor", SMALL_DABS), ("qformer", SMALL_QFORMER)])
def test_runs_in_bf16_without_autocast(kind, options):
    conn = build_connector(ConnectorSpec(kind, **options), 32, 48, num_patches=16).to(torch.bfloat16)
    out = conn(torch.randn(2, 16, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, options["num_queries"], 48)


def test_a_tower_that_keeps_its_cls_token_is_told_to_drop_it():
    with pytest.raises(ConfigError, match=r"hands it 577 tokens, not a square.*select=patch"):
        meta_connector("d_abstractor", 1024, 577)
