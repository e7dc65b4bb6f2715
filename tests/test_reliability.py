"""Runs that survive: the non-finite guard (a bad step updates nothing, metrics.jsonl stays
strict JSON, too many in a row stop the run before a final/), and a trainer state saved
without pickle (safetensors + JSON; a pickled one from an older tinylmm is refused)."""

import json
import random

import numpy as np
import pytest
import torch

from tinylmm.config import resolve
from tinylmm.errors import DivergenceError, RunStateError
from tinylmm.models.lmm import TinyLMM
from tinylmm.train import checkpoint as ckpt
from tinylmm.train import trainer_state
from tinylmm.train.loop import train

from conftest import TINY, tiny_stages


def _strict_records(run_dir):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _poison(monkeypatch, bad_calls):
    """The forward's loss becomes NaN on the given (1-based) training calls."""
    forward, calls = TinyLMM.forward, {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if out.loss_sum is not None and torch.is_grad_enabled():
            calls["n"] += 1
            if bad_calls == "all" or calls["n"] in bad_calls:
                out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(TinyLMM, "forward", poisoned)


def _count_updates(monkeypatch):
    counter = {"n": 0}
    step = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        counter["n"] += 1
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    return counter


def test_a_non_finite_step_makes_no_update_and_is_recorded_as_null(tmp_path, monkeypatch):
    # base: 4 pretrain + 4 finetune steps of one micro-batch; pretrain's 2nd step's loss is NaN
    overrides = TINY + tiny_stages(("pretrain", "finetune"), steps=4, batch=4, micro=4)
    cfg, sources = resolve("toy", "base", overrides, output_dir=str(tmp_path / "r"))
    _poison(monkeypatch, {2})
    updates = _count_updates(monkeypatch)
    result = train(cfg, sources, evaluate=False)
    recs = [r for r in _strict_records(tmp_path / "r") if "step" in r]
    assert [r["loss"] is None for r in recs] == [False, True] + [False] * 6
    assert recs[1]["grad_norm"] is None and all(r["lr"] is not None for r in recs)
    assert updates["n"] == 7  # 8 steps, one made no update
    assert all(np.isfinite(x) for i, x in enumerate(result.losses["pretrain"]) if i != 1)
    assert (tmp_path / "r" / "finetune" / "final" / "model.safetensors").exists()


def test_too_many_bad_steps_in_a_row_stop_the_run_before_final(tmp_path, monkeypatch):
    overrides = TINY + tiny_stages(("pretrain", "finetune"), steps=6, batch=4, micro=4)
    overrides += ["stages.pretrain.save_every=2", "train.max_bad_steps=2"]
    cfg, sources = resolve("toy", "base", overrides, output_dir=str(tmp_path / "r"))
    _poison(monkeypatch, {3, 4})  # pretrain steps 3 and 4
    with pytest.raises(DivergenceError, match=r"stages\.pretrain: 2 steps in a row to step 4 .*max_bad_steps=2"):
        train(cfg, sources, evaluate=False)
    run = tmp_path / "r"
    assert not (run / "pretrain" / "final").exists() and not (run / "finetune").exists()
    assert (run / "pretrain" / "step-000002" / trainer_state.META).exists()  # the last good checkpoint stays
    assert [r["loss"] is None for r in _strict_records(run)] == [False, False, True, True]


def test_max_bad_steps_must_be_positive():
    from tinylmm.config import ConfigError

    with pytest.raises(ConfigError, match="train.max_bad_steps=0"):
        resolve("toy", "share", ["train.max_bad_steps=0"])


def _optimizer_with_state(cls=torch.optim.AdamW):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    opt = cls([{"params": params[:1], "lr": 1e-3}, {"params": params[1:], "lr": 2e-3, "weight_decay": 0.1}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    return params, opt, sched


def _assert_same(got, want, where="state"):
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}.{i}")
    else:
        assert got == want, where


@pytest.mark.parametrize("kind", ["adamw", "adamw_8bit"])
def test_trainer_state_round_trips_without_pickle(tmp_path, kind):
    if kind == "adamw_8bit":
        bnb = pytest.importorskip("bitsandbytes")
        params, opt, sched = _optimizer_with_state(bnb.optim.AdamW8bit)
    else:
        params, opt, sched = _optimizer_with_state()
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    state = {"step": 3, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": ckpt.rng_state()}
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    trainer_state.save(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([trainer_state.TENSORS, trainer_state.META])
    json.loads((tmp_path / trainer_state.META).read_text(), parse_constant=lambda c: pytest.fail(c))

    back = trainer_state.load(tmp_path)
    assert back["step"] == 3
    _, opt2, sched2 = _optimizer_with_state(type(opt))
    opt2.load_state_dict(back["optimizer"])
    sched2.load_state_dict(back["scheduler"])
    _assert_same(opt2.state_dict(), opt.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()
    ckpt.set_rng_state(back["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_a_pickled_trainer_state_is_refused_not_loaded(tmp_path):
    torch.save({"step": 1}, tmp_path / trainer_state.LEGACY)
    with pytest.raises(RunStateError, match="pickled by an older tinylmm; it is not loaded"):
        trainer_state.load(tmp_path)
    (tmp_path / trainer_state.LEGACY).unlink()
    with pytest.raises(RunStateError, match="not a step checkpoint"):
        trainer_state.load(tmp_path)
