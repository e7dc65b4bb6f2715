"""`--tune auto`: per stage the first of full, lora, qlora whose memory plan fits the device,
with the recipe's micro-batch or the largest smaller divisor of the global batch; the recipe
as written on a device the planner does not model. Real zoo presets, planned on meta."""

import io
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from tinylmm import api
from tinylmm.config import dump_resolved, load_resolved, resolve
from tinylmm.config.tune_auto import HEADER_KEY
from tinylmm.errors import ConfigError
from tinylmm.memory import Device, GiB, detect_device, plan_run

PHI2 = "tinyllava-phi2-siglip-3.1b"
GPU24 = Device("cuda", 24 * GiB, "a 24 GiB test GPU")


def auto(preset, budget_gib=24, overrides=(), **kw):
    return api.resolve_config(preset, "share", overrides, device=Device("cuda", budget_gib * GiB, "test GPU"), **kw)


def llm_modes(cfg):
    return {n: st.tune["llm"] for n, st in cfg.stages.items()}


def micro(cfg):
    return {n: st.micro_batch_size for n, st in cfg.stages.items()}


def test_auto_turns_phi2s_share_recipe_into_one_that_fits_24_gib():
    recipe, _ = resolve(PHI2, "share")
    assert not plan_run(recipe, budget_bytes=24 * GiB).fits  # the recipe as written: share plans 59 GiB
    cfg, sources = auto(PHI2)
    assert llm_modes(cfg) == {"pretrain": "frozen", "share": "lora", "finetune": "lora"}
    assert micro(cfg) == micro(recipe) and [s.batch_size for s in cfg.stages.values()] == [256, 256, 128]
    assert cfg.stages["share"].llm_lr == cfg.lora.lr == 2e-4 and cfg.stages["share"].lr == 2e-5
    plan = plan_run(cfg, budget_bytes=24 * GiB)
    assert plan.fits and max(s.total for s in plan.stages) <= 24 * GiB
    assert sources["stages.share.tune.llm"] == sources["stages.share.llm_lr"] == "--tune auto"
    assert sources["stages.pretrain.tune.llm"] == "recipe:share"  # untouched: the LLM is frozen there
    head = "pretrain: LLM frozen micro-batch 16 (plans 17.65 GiB of 24.00 GiB); share: lora micro-batch 8 (plans"
    assert sources[HEADER_KEY].startswith(head)


def test_auto_keeps_full_where_it_fits_and_lowers_the_micro_batch_only_where_needed():
    cfg, sources = auto("qwen2.5-0.5b-siglip-0.8b")
    assert llm_modes(cfg) == {"pretrain": "frozen", "share": "full", "finetune": "full"}
    assert micro(cfg) == {"pretrain": 32, "share": 8, "finetune": 8}
    assert not any(v == "--tune auto" for k, v in sources.items() if not k.startswith("#"))
    # TinyLlama + CLIP: share trains in full at micro-batch 2 (the largest divisor of 256 that
    # fits), the global batch unchanged; finetune keeps the recipe's 8
    cfg, sources = auto("tinyllava-tinyllama-clip-1.3b")
    assert llm_modes(cfg)["share"] == "full" and micro(cfg) == {"pretrain": 32, "share": 2, "finetune": 8}
    assert cfg.stages["share"].batch_size == 256 and sources["stages.share.micro_batch_size"] == "--tune auto"
    four = ["stages.share.micro_batch_size=4"]
    full, _ = api.resolve_config("tinyllava-tinyllama-clip-1.3b", "share", four, tune="full")
    assert not plan_run(full).stages[1].fits  # in full, 4 would not have fitted
    cfg, _ = auto("tinyllava-tinyllama-clip-1.3b", overrides=four)  # a micro-batch the user set is kept
    assert llm_modes(cfg)["share"] == "lora" and micro(cfg)["share"] == 4


def test_a_full_stage_may_follow_a_lora_one_but_qlora_binds_the_stages_after_it():
    cfg, _ = auto("tinyllava-tinyllama-siglip-1.5b")  # share needs lora; finetune fits in full at 4
    assert llm_modes(cfg) == {"pretrain": "frozen", "share": "lora", "finetune": "full"}
    assert micro(cfg)["finetune"] == 4
    cfg, sources = auto(PHI2, budget_gib=12)  # share fits only as qlora; the base is 4-bit from then on
    assert llm_modes(cfg) == {"pretrain": "frozen", "share": "qlora", "finetune": "qlora"}
    assert micro(cfg) == {"pretrain": 4, "share": 1, "finetune": 2}
    assert plan_run(cfg, budget_bytes=12 * GiB).fits


def test_when_nothing_fits_the_last_candidate_is_kept_and_the_plan_still_says_so():
    cfg, sources = auto(PHI2, budget_gib=4)
    assert llm_modes(cfg)["share"] == "qlora" and micro(cfg)["share"] == 1
    assert "over: nothing tried fits" in sources[HEADER_KEY]
    plan = plan_run(cfg, budget_bytes=4 * GiB)
    assert not plan.stages[1].fits and "over the 4.00 GiB budget" in plan.stages[1].warning()


def test_overrides_win_over_the_choice():
    cfg, sources = auto(PHI2, overrides=["stages.share.tune.llm=full"])
    assert llm_modes(cfg) == {"pretrain": "frozen", "share": "full", "finetune": "lora"}
    assert sources["stages.share.tune.llm"] == "override" and "share: full micro-batch 1" in sources[HEADER_KEY]
    # a later stage held to lora by an override: share cannot go 4-bit before it (qlora may not precede lora)
    cfg, sources = auto(PHI2, budget_gib=12, overrides=["stages.finetune.tune.llm=lora"])
    assert llm_modes(cfg) == {"pretrain": "frozen", "share": "lora", "finetune": "lora"}
    assert "share: lora micro-batch 1 (plans 14.45 GiB of 12.00 GiB, over: nothing tried fits)" in sources[HEADER_KEY]


def test_on_a_cpu_or_mps_the_recipes_modes_are_kept():
    recipe, _ = resolve(PHI2, "share")
    for device in (Device("cpu", 0, "cpu"), Device("mps", 0, "Apple mps")):
        cfg, sources = api.resolve_config(PHI2, "share", tune="auto", device=device)
        assert cfg.stages == recipe.stages
        assert sources[HEADER_KEY] == (
            f"the recipe's modes kept: no CUDA device ({device.name}); the memory planner models CUDA GPUs only"
        )


def test_forced_modes_still_force_and_the_toy_keeps_its_recipe_by_default(monkeypatch):
    monkeypatch.setattr("tinylmm.memory.detect_device", lambda: GPU24)
    cfg, sources = api.resolve_config(PHI2, "share", tune="full")
    assert llm_modes(cfg)["share"] == "full" and HEADER_KEY not in sources
    cfg, sources = api.resolve_config(PHI2, "share", tune="qlora")
    assert llm_modes(cfg) == {"pretrain": "frozen", "share": "qlora", "finetune": "qlora"}
    assert HEADER_KEY not in sources
    toy, toy_sources = api.resolve_config("toy", "share")
    assert (toy, toy_sources) == resolve("toy", "share")
    _, sources = api.resolve_config("toy", "share", tune="auto")  # asked for: the toy fits in full
    assert "share: full micro-batch 16 (plans" in sources[HEADER_KEY]
    cfg, _ = api.resolve_config(PHI2, "share")  # unset: auto on the detected device
    assert llm_modes(cfg)["share"] == "lora"
    with pytest.raises(ConfigError, match="did you mean 'auto'"):
        api.resolve_config(PHI2, "share", tune="autoo")


def test_the_choice_is_written_in_config_yaml_and_a_saved_config_keeps_it(tmp_path, monkeypatch):
    cfg, sources = auto(PHI2)
    path = tmp_path / "config.yaml"
    dump_resolved(cfg, sources, path)
    text = path.read_text()
    assert "\n# --tune auto: pretrain: LLM frozen micro-batch 16 (plans 17.65 GiB of 24.00 GiB); share: lora" in text
    assert "llm: lora  # --tune auto" in text
    assert load_resolved(path).stages == cfg.stages  # what --resume reads back
    # --config on another GPU: the saved stages, not a new choice
    monkeypatch.setattr("tinylmm.memory.detect_device", lambda: Device("cuda", 8 * GiB, "8 GiB"))
    again, again_sources = api.resolve_config(config=path)
    assert again.stages == cfg.stages and HEADER_KEY not in again_sources
    with pytest.raises(ConfigError, match="a saved --config already holds"):
        api.resolve_config(config=path, tune="auto")


def test_detect_device_reads_the_cuda_devices_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    props = SimpleNamespace(total_memory=25_757_220_864, name="NVIDIA GeForce RTX 4090")  # 24564 MiB
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    assert detect_device() == Device("cuda", 25_757_220_864, "NVIDIA GeForce RTX 4090")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert detect_device() == Device("cpu", 0, "cpu")


def test_train_announces_the_choice_before_training(tmp_path, monkeypatch):
    from rich.console import Console

    monkeypatch.setattr("tinylmm.memory.detect_device", lambda: GPU24)
    (tmp_path / "config.yaml").write_text("")  # the loop stops here, before any weights load
    buf = io.StringIO()
    with pytest.raises(FileExistsError):
        api.train_run(PHI2, "share", output_dir=tmp_path, console=Console(file=buf, width=400))
    assert "--tune auto (a 24 GiB test GPU, 24.00 GiB): pretrain: LLM frozen micro-batch 16" in buf.getvalue()


def run_cli(monkeypatch, capsys, *args):
    from tinylmm.cli.app import app
    from tinylmm.cli.errors import run_cli

    monkeypatch.setattr(sys, "argv", ["tinylmm", *args])
    code = run_cli(app)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_plan_shows_what_auto_chooses_and_help_says_what_auto_does(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "plan", "--preset", PHI2, "--budget", "12GB", "--json")
    data = json.loads(out)
    assert code == 0 and data["fits"] and [s["tune"]["llm"] for s in data["stages"]] == ["frozen", "qlora", "qlora"]
    assert data["tune_auto"].startswith("--tune auto (the planned cuda device, 12.00 GiB): pretrain:")
    code, out, _ = run_cli(monkeypatch, capsys, "plan", "--preset", PHI2, "--tune", "full", "--json")
    assert code == 0 and not json.loads(out)["fits"] and json.loads(out)["tune_auto"] == ""
    code, out, _ = run_cli(monkeypatch, capsys, "plan", "--preset", PHI2, "--device", "cpu", "--budget", "64GB")
    assert code == 0 and "the recipe's modes kept" in out
    for command in ("train", "plan"):
        code, out, _ = run_cli(monkeypatch, capsys, command, "--help")
        assert code == 0 and "auto" in out and "lora, qlora" in out
