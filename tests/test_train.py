"""End-to-end training on a tiny config: literal losses, resume after SIGKILL, 2 processes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tinylmm.config import resolve
from tinylmm.train import checkpoint as ckpt
from tinylmm.train.loop import train

from conftest import TINY, tiny_stages

# Per-stage step losses of the tiny share run below, recorded with torch 2.14 on CPU, fp32
# (the shapes world and the toy's schedule of issue 11).
# A change here means training numerics changed: check it was intended, then update.
EXPECTED = {
    "pretrain": [6.2603, 6.2455, 6.242],
    "share": [6.2372, 6.0118, 5.8718],
    "finetune": [6.0433, 5.8163, 5.6498],
}


def losses_of(run_dir: Path) -> list[tuple[str, int, float]]:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in recs]


def test_tiny_share_run_literal_losses_and_layout(tmp_path, tiny_overrides):
    cfg, sources = resolve("toy", "share", tiny_overrides, output_dir=str(tmp_path / "run"))
    result = train(cfg, sources, evaluate=False)
    run = tmp_path / "run"
    assert list(result.losses) == list(EXPECTED)
    for stage, losses in EXPECTED.items():
        assert result.losses[stage] == pytest.approx(losses, abs=1e-3), stage
    for stage in ("pretrain", "share", "finetune"):
        assert (run / stage / "final" / "model.safetensors").exists()
    assert (run / "final").resolve() == (run / "finetune" / "final").resolve()
    for f in ("tinylmm.json", "llm/config.json", "vision/config.json", "image_processor.json", "tokenizer"):
        assert (run / "final" / f).exists(), f
    text = (run / "config.yaml").read_text()
    assert "# preset:toy" in text and "# recipe:share" in text and "# override" in text
    assert len(losses_of(run)) == 9


def _kill_script(out: Path, overrides: list[str], stage: str, step: int, tune=None, mid_save=False) -> str:
    """A run killed with SIGKILL right after the step-`step` checkpoint of `stage`, or in the
    middle of writing it (`mid_save`: the weights written, the trainer state half written)."""
    return textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import tinylmm.train.loop as loop
        from tinylmm.train import trainer_state
        from tinylmm.api import train_run
        save, save_state = loop._save_step, trainer_state.save
        def save_then_die(accel, model, processor, optimizer, scheduler, stage_dir, step):
            save(accel, model, processor, optimizer, scheduler, stage_dir, step)
            if stage_dir.name == {stage!r} and step == {step}:
                os.kill(os.getpid(), signal.SIGKILL)
        def die_while_saving(state, directory):
            if Path(directory).parent.name == {stage!r} and state["step"] == {step}:
                (Path(directory) / trainer_state.TENSORS).write_bytes(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
            save_state(state, directory)
        if {mid_save!r}:
            trainer_state.save = die_while_saving
        else:
            loop._save_step = save_then_die
        train_run(overrides={overrides!r}, output_dir={str(out)!r}, evaluate=False, tune={tune!r})
    """)


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
# qlora: the resumed run rebuilds the 4-bit base from the run's llm-base/, re-attaches the
# LLM and vision adapters and loads their step-4 weights (TinyLLaVA_Factory issue #170).
# mid-save: killed while writing the step-4 checkpoint, the run resumes from step 2.
@pytest.mark.parametrize(("tune", "mid_save"), [(None, True), ("qlora", False)])
def test_resume_after_sigkill_gives_the_same_losses(tmp_path, tune, mid_save):
    overrides = TINY + tiny_stages(steps=5) + [f"stages.{s}.save_every=2" for s in ("pretrain", "share", "finetune")]
    tune_args = []
    if tune:
        overrides += ["lora.r=8", "lora.alpha=16", "stages.share.tune.vision=lora"]
        tune_args = ["--tune", tune]
    # Uninterrupted reference, in a process like the others (same thread count, same numerics).
    ref = tmp_path / "ref"
    proc = subprocess.run(
        [sys.executable, "-m", "tinylmm.cli.app", "train", "-o", str(ref), "--no-eval", *tune_args, *overrides],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Killed with SIGKILL right after (or in the middle of writing) the step-4 checkpoint of the middle stage.
    run = tmp_path / "run"
    script = _kill_script(run, overrides, "share", 4, tune, mid_save)
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (run / "share" / "final").exists()
    if mid_save:  # the half-written checkpoint is left under its temporary name, which resume ignores
        assert (run / "share" / "step-000004.tmp" / "model.safetensors").exists()
        assert not (run / "share" / "step-000004").exists()
        assert ckpt.latest_step(run / "share").name == "step-000002"
    else:
        assert (run / "share" / "step-000004").exists() and not list(run.glob("*/*.tmp"))
    # Resumed through the CLI.
    proc = subprocess.run(
        [sys.executable, "-m", "tinylmm.cli.app", "train", "--resume", str(run), "--no-eval"],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("resuming from" in proc.stderr) and (("step 2)" if mid_save else "step 4)") in proc.stderr)
    assert losses_of(run) == losses_of(ref)
    assert len(losses_of(run)) == 5 + 5 + 5


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_match_one(tmp_path):
    overrides = TINY + tiny_stages(steps=2, batch=8, micro=2)
    one, two = tmp_path / "one", tmp_path / "two"
    cfg, sources = resolve("toy", "share", overrides, output_dir=str(one))
    train(cfg, sources, evaluate=False)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29533",
        "-m",
        "tinylmm.cli.app",
        "train",
        "-o",
        str(two),
        "--no-eval",
        *overrides,
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes: 2" in proc.stderr and "(2 x 2 x 2 proc)" in proc.stderr
    a, b = losses_of(one), losses_of(two)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for (_, _, la), (_, _, lb) in zip(a, b):
        assert abs(la - lb) < 1e-4
    assert (two / "final" / "model.safetensors").exists()
