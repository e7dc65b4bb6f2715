"""Every training option does what it says."""

import pytest
import torch

from tinylmm.config import ConfigError, resolve
from tinylmm.train.loop import train
from tinylmm.train.runtime import resolve_attention, resolve_precision
from tinylmm.train.schedule import StageSteps, lr_lambda, micro_batches, step_indices

from conftest import TINY, tiny_stages


def test_schedules():
    cos = lr_lambda("cosine", warmup=3, total=13)
    assert [round(cos(s), 3) for s in range(3)] == [0.333, 0.667, 1.0]
    assert cos(3) == 1.0 and cos(8) == pytest.approx(0.5) and cos(13) == pytest.approx(0.0)
    lin = lr_lambda("linear", warmup=0, total=10)
    assert lin(5) == pytest.approx(0.5) and lin(10) == 0.0
    assert lr_lambda("constant", warmup=2, total=10)(9) == 1.0


def test_data_order_depends_on_seed_and_epoch_and_shards_by_rank():
    plan = StageSteps(
        num_samples=20, global_batch=8, micro_batch=2, world_size=2, steps_per_epoch=2, total_steps=6, warmup_steps=0
    )
    epoch0 = step_indices(plan, 0, seed=1) + step_indices(plan, 1, seed=1)
    assert len(set(epoch0)) == 16  # no sample twice within an epoch
    assert step_indices(plan, 2, seed=1) != step_indices(plan, 0, seed=1)  # reshuffled each epoch
    assert step_indices(plan, 0, seed=2) != step_indices(plan, 0, seed=1)
    idx = step_indices(plan, 0, seed=1)
    r0, r1 = micro_batches(plan, idx, 0), micro_batches(plan, idx, 1)
    assert plan.accumulation == 2 and sorted(sum(r0 + r1, [])) == sorted(idx)


def test_precision_and_attention_resolution():
    assert resolve_precision("fp32") == ("no", "fp32 (requested)")
    mode, note = resolve_precision("auto")
    assert mode in ("bf16", "no") and ("fallback" in note) == (mode == "no")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="GPU"):
            resolve_precision("fp16")
    impl, note = resolve_attention("flash_attention_2", torch.device("cpu"))
    assert impl == "sdpa" and "fallback" in note
    assert resolve_attention("eager", torch.device("cpu"))[0] == "eager"


def run(tmp_path, name, extra, steps=2):
    cfg, sources = resolve(
        "toy",
        "base",
        TINY + tiny_stages(("pretrain", "finetune"), steps=steps) + extra,
        output_dir=str(tmp_path / name),
    )
    return train(cfg, sources, evaluate=False)


def test_gradient_checkpointing_attention_and_workers_keep_the_losses(tmp_path, monkeypatch):
    import tinylmm.train.loop as loop

    seen = {}
    build = loop.build_model

    def spy(spec, **kw):
        model, proc = build(spec, **kw)
        seen.setdefault("models", []).append(model)
        return model, proc

    monkeypatch.setattr(loop, "build_model", spy)
    base = run(tmp_path, "base", [])
    ckpt = run(tmp_path, "ckpt", ["train.gradient_checkpointing=true"])
    eager = run(tmp_path, "eager", ["train.attn_implementation=eager"])
    workers = run(tmp_path, "workers", ["train.num_workers=1"])
    m_base, m_ckpt, m_eager, _ = seen["models"]

    def checkpointed(m):
        return getattr(m, "is_activation_checkpointing", None) or m.is_gradient_checkpointing

    assert not checkpointed(m_base.llm)
    assert checkpointed(m_ckpt.llm) and checkpointed(m_ckpt.vision.model)
    assert m_eager.llm.config._attn_implementation == "eager"
    assert m_base.llm.config._attn_implementation == "sdpa"
    for other in (ckpt, eager, workers):
        for stage in base.losses:
            assert other.losses[stage] == pytest.approx(base.losses[stage], abs=1e-4)


def test_train_seed_changes_the_data_order(tmp_path):
    a = run(tmp_path, "a", [])
    b = run(tmp_path, "b", ["train.seed=7"])
    assert a.losses["pretrain"] != b.losses["pretrain"]


def test_per_stage_lr_warmup_and_max_steps_reach_the_optimizer(tmp_path):
    import json

    res = run(
        tmp_path,
        "lr",
        ["stages.finetune.lr=4e-3", "stages.finetune.warmup_ratio=0.5", "stages.finetune.scheduler=constant"],
        steps=4,
    )
    recs = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs if r["stage"] == "finetune"]
    assert lrs == pytest.approx([2e-3, 4e-3, 4e-3, 4e-3])  # warmup 2 of 4 steps, then constant
    assert len(res.losses["finetune"]) == 4


def test_unknown_benchmark():
    with pytest.raises(ConfigError, match="did you mean 'shapes'"):
        resolve("toy", "share", ["eval.bench=[shape]"])
