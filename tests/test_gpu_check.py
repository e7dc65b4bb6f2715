"""bench/gpu_check.py runs on the CPU in its tiny setting: every stage of the share recipe
under --tune qlora and --tune lora, its JSON and its table."""

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_runs_every_stage_in_the_tiny_setting(tmp_path):
    gpu_check = _module()
    out = tmp_path / "check.json"
    rows = gpu_check.main(["--tiny", "--presets", "tinyllama", "--steps", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["tiny"] and data["device"] == "cpu" and data["rows"] == rows
    assert [(r["tune_flag"], r["stage"]) for r in rows] == [
        (t, s) for t in ("qlora", "lora") for s in ("pretrain", "share", "finetune")
    ]
    for r in rows:
        assert math.isfinite(r["loss_last"]) and r["tokens_per_s"] > 0 and r["planned_gib"] > 0
        assert r["max_memory_allocated_gib"] is None  # no CUDA here: only the planner's figure
        assert r["kernels"]["loss_kernel"] == "torch" and r["kernels"]["attention"] == "sdpa"
        # the LLM trains through adapters where the recipe trains it; the 4-bit base only under qlora
        four_bit = r["kernels"]["bnb_4bit_layers"] > 0
        assert four_bit == (r["tune_flag"] == "qlora" and r["stage"] != "pretrain"), r
        assert not r["kernels"]["bnb_4bit_on_cuda"]
    table = gpu_check.table(rows)
    assert table.count("\n") == len(rows) + 1 and "| tinyllava-tinyllama-siglip-1.5b | qlora | share |" in table
