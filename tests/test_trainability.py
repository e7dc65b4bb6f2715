"""Trainability (tinylmm/trainability.py): requires_grad flags, optimizer groups, and frozen parts untouched."""

import torch

from tinylmm.config import StageConfig
from tinylmm.models.assemble import build_model
from tinylmm.trainability import apply as apply_plan
from tinylmm.trainability import param_groups

from test_models import spec


def stage(**tune):
    return StageConfig(
        tune={"vision": "frozen", "connector": "full", "llm": "frozen", **tune},
        lr=1e-2,
        connector_lr=5e-2,
        vision_lr=3e-3,
        weight_decay=0.1,
    )


def trainable_names(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_connector_only():
    model, _ = build_model(spec())
    s = apply_plan(model, stage())
    assert s.trainable["vision"] == 0 and s.trainable["llm"] == 0
    assert s.trainable["connector"] == s.total["connector"] > 0


def test_partial_vision_from_layer():
    model, _ = build_model(spec())  # SigLIP tower cut at -2: 2 layers kept
    apply_plan(model, stage(vision="partial:1", llm="full"))
    names = trainable_names(model.vision)
    assert names and all(".layers.1." in n for n in names)
    assert not any("embeddings" in n or ".layers.0." in n for n in names)
    assert trainable_names(model.llm) == {n for n, _ in model.llm.named_parameters()}


def test_partial_llm_trains_top_layers_norm_and_head():
    model, _ = build_model(spec())
    apply_plan(model, stage(llm="partial:-1"))
    names = trainable_names(model.llm)
    assert any(".layers.1." in n for n in names) and not any(".layers.0." in n for n in names)
    assert "model.norm.weight" in names and "model.embed_tokens.weight" not in names


def test_groups_have_own_lr_and_no_decay_on_norms():
    model, _ = build_model(spec())
    st = stage(vision="full", llm="full")
    apply_plan(model, st)
    groups = {g["name"]: g for g in param_groups(model, st)}
    assert groups["connector/decay"]["lr"] == 5e-2
    assert groups["vision/decay"]["lr"] == 3e-3
    assert groups["llm/decay"]["lr"] == 1e-2
    assert groups["llm/no_decay"]["weight_decay"] == 0.0 and groups["llm/decay"]["weight_decay"] == 0.1
    assert all(p.ndim >= 2 for p in groups["llm/decay"]["params"])
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == sum(1 for p in model.parameters() if p.requires_grad)


def test_frozen_parameters_stay_bit_identical_after_a_step():
    from PIL import Image

    model, proc = build_model(spec())
    st = stage(vision="partial:1")
    apply_plan(model, st)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, st))
    enc = proc.encode([("human", "<image>\nWhat color?"), ("gpt", "red")], num_images=1)
    ids = torch.tensor([enc.input_ids])
    out = model(
        ids, torch.ones_like(ids), proc.image_processor(Image.new("RGB", (32, 32)))[None], torch.tensor([enc.labels])
    )
    out.loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == p.requires_grad, n
