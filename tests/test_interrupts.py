"""Runs that survive signals and full disks: SIGINT/SIGTERM save a checkpoint at the next
step boundary and say how to resume (a second SIGINT quits at once); a checkpoint write that
fails (ENOSPC) keeps what was written before and stops with a clear error; both resume to
the per-step losses of an uninterrupted run. Also the global batch under several processes
(the micro-batch gives way) and `tinylmm launch`."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinylmm.cli.app import app
from tinylmm.cli.errors import run_cli
from tinylmm.config import resolve
from tinylmm.errors import ConfigError, RunInterrupted, RunStateError
from tinylmm.files import write_atomically
from tinylmm.train import checkpoint as ckpt
from tinylmm.train import trainer_state
from tinylmm.train.loop import train
from tinylmm.train.progress import Reporter
from tinylmm.train.schedule import fit_micro_batch

from conftest import TINY, tiny_stages

# base recipe: 4 pretrain + 4 finetune steps of one micro-batch, a checkpoint every 2 steps
OVERRIDES = TINY + tiny_stages(("pretrain", "finetune"), steps=4, batch=4, micro=4)
OVERRIDES += ["stages.pretrain.save_every=2", "stages.finetune.save_every=2"]


def losses_of(run_dir: Path) -> list:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in recs if "step" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    cfg, sources = resolve("toy", "base", OVERRIDES, output_dir=str(run))
    train(cfg, sources, evaluate=False)
    return losses_of(run)


def _signal_at(monkeypatch, stage: str, step: int, *signums):
    """Deliver `signums` to this process right after (stage, step) is reported."""
    report = Reporter.step

    def step_then_signal(self, name, index, done, *args):
        report(self, name, index, done, *args)
        if (name, done) == (stage, step):
            for s in signums:
                os.kill(os.getpid(), s)

    monkeypatch.setattr(Reporter, "step", step_then_signal)


def _cli(monkeypatch, *argv) -> int:
    monkeypatch.setattr(sys, "argv", ["tinylmm", *argv])
    return run_cli(app)


def test_sigint_saves_a_checkpoint_at_the_next_step_and_resumes_to_the_same_losses(
    tmp_path, monkeypatch, capsys, reference
):
    run = tmp_path / "run"
    _signal_at(monkeypatch, "finetune", 3, signal.SIGINT)
    code = _cli(monkeypatch, "train", "--recipe", "base", "-o", str(run), "--no-eval", *OVERRIDES)
    err = capsys.readouterr().err
    assert code == 130
    assert "SIGINT: stopped at stage 'finetune' step 3/4" in err
    assert f"resume with: tinylmm train --resume {run}" in " ".join(err.split())
    assert (run / "finetune" / "step-000003" / trainer_state.META).exists()  # not a save_every step: the signal's
    assert not (run / "finetune" / "final").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    monkeypatch.undo()
    assert _cli(monkeypatch, "train", "--resume", str(run), "--no-eval") == 0
    assert "resuming from" in capsys.readouterr().err
    assert losses_of(run) == reference


def test_sigterm_stops_the_same_way_with_its_own_exit_code(tmp_path, monkeypatch):
    cfg, sources = resolve("toy", "base", OVERRIDES, output_dir=str(tmp_path / "run"))
    _signal_at(monkeypatch, "pretrain", 1, signal.SIGTERM)
    with pytest.raises(RunInterrupted, match="SIGTERM: stopped at stage 'pretrain' step 1/4") as e:
        train(cfg, sources, evaluate=False)
    assert e.value.exit_code == 143
    assert ckpt.latest_step(tmp_path / "run" / "pretrain").name == "step-000001"


def test_a_signal_during_the_last_stage_finishes_it_and_skips_the_evaluation(tmp_path, monkeypatch):
    cfg, sources = resolve("toy", "base", OVERRIDES, output_dir=str(tmp_path / "run"))
    _signal_at(monkeypatch, "finetune", 4, signal.SIGINT)  # the stage's last step: nothing left to save
    with pytest.raises(RunInterrupted, match="every stage is trained .*evaluation was skipped"):
        train(cfg, sources, evaluate=True)
    run = tmp_path / "run"
    assert (run / "final" / "tinylmm.json").exists() and not (run / "eval").exists()


def test_a_second_sigint_quits_at_once(tmp_path, monkeypatch):
    cfg, sources = resolve("toy", "base", OVERRIDES, output_dir=str(tmp_path / "run"))
    _signal_at(monkeypatch, "pretrain", 1, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, sources, evaluate=False)
    assert ckpt.latest_step(tmp_path / "run" / "pretrain") is None  # no checkpoint was waited for
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_full_disk_keeps_the_previous_checkpoint_and_the_run_resumes(tmp_path, monkeypatch, reference):
    run = tmp_path / "run"
    save = trainer_state.save

    def disk_full_at_step_4(state, directory):
        if state["step"] == 4 or Path(directory).name == "step-000004.tmp":
            (Path(directory) / trainer_state.TENSORS).write_bytes(b"\0" * 1024)  # a partial write
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(state, directory)

    monkeypatch.setattr(trainer_state, "save", disk_full_at_step_4)
    cfg, sources = resolve("toy", "base", OVERRIDES + ["stages.pretrain.max_steps=6"], output_dir=str(run))
    with pytest.raises(RunStateError, match=r"step-000004 failed: the disk is full .*free some space, then resume"):
        train(cfg, sources, evaluate=False)
    assert not list(run.glob("*/*.tmp"))  # the partial write is gone, with the space it took
    assert [p.name for p in (run / "pretrain").iterdir() if p.name.startswith("step")] == ["step-000002"]
    assert trainer_state.load(run / "pretrain" / "step-000002")["step"] == 2  # intact
    monkeypatch.undo()
    # the run as it was configured resumes from step 2 (max_steps 6: a reference of its own)
    ref = tmp_path / "ref"
    cfg, sources = resolve("toy", "base", OVERRIDES + ["stages.pretrain.max_steps=6"], output_dir=str(ref))
    train(cfg, sources, evaluate=False)
    train(resume_dir=run, evaluate=False)
    assert losses_of(run) == losses_of(ref)


def test_a_failed_write_leaves_the_folder_it_would_replace_as_it_was(tmp_path):
    dest = tmp_path / "final"
    write_atomically(dest, lambda d: (d / "weights").write_text("good"))

    def fails(d):
        (d / "weights").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(dest, fails)
    assert (dest / "weights").read_text() == "good" and not (tmp_path / "final.tmp").exists()


@pytest.mark.parametrize(
    ("batch", "micro", "world", "want"),
    [(16, 16, 1, 16), (16, 16, 2, 8), (16, 6, 2, 4), (128, 32, 3, None), (8, 8, 8, 1), (12, 4, 3, 4)],
)
def test_the_micro_batch_gives_way_to_the_processes(batch, micro, world, want):
    if want is None:
        with pytest.raises(ConfigError, match="stages.x: batch_size 128 cannot be split evenly over 3 processes"):
            fit_micro_batch(batch, micro, world, "stages.x")
        return
    got = fit_micro_batch(batch, micro, world, "stages.x")
    assert got == want and batch % (got * world) == 0


def _readme_launch_command() -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("tinylmm launch "))
    return line.split()[1:]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _wait_for(path: Path, pattern: str, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and re.search(pattern, path.read_text()):
            return
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} never appeared in {path} (exit {proc.poll()})")


@pytest.mark.slow
def test_the_readmes_multi_process_command_stops_on_ctrl_c_resumes_and_a_failure_prints_once(tmp_path):
    cmd = _readme_launch_command()  # e.g. launch --num_processes 2 train --recipe share
    assert "--num_processes" in cmd and "train" in cmd
    i = cmd.index("train")
    launch = [sys.executable, "-m", "tinylmm.cli.app", *cmd[:i], "--main_process_port", "29551"]
    # As written, on the tiny config: 8 samples a step at micro-batch 8 (8 x 2 does not
    # divide 8); finetune long enough to be interrupted in the middle.
    tiny = TINY + tiny_stages(steps=2, batch=8, micro=8) + ["stages.finetune.max_steps=60", "stages.finetune.epochs=10"]
    ref = tmp_path / "ref"
    cfg, sources = resolve("toy", "share", tiny, output_dir=str(ref))
    train(cfg, sources, evaluate=False)
    run = tmp_path / "run"
    # Ctrl-C in a terminal: SIGINT to the whole process group (the launcher and both processes).
    proc = subprocess.Popen(
        [*launch, *cmd[i:], "--no-eval", "-o", str(run), *tiny],
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_for(run / "metrics.jsonl", r'"stage": "finetune", "stage_index": 2, "step": 3,', proc)
    os.killpg(proc.pid, signal.SIGINT)
    err = " ".join(proc.communicate(timeout=300)[1].split())
    assert proc.returncode == 130, err[-3000:]
    assert "processes: 2" in err and "micro_batch_size 8 -> 4, so that 4 x 2 processes divide batch_size 8" in err
    assert err.count("interrupted: SIGINT: stopped at stage 'finetune' step") == 1  # the main process's line
    assert "Traceback" not in err and "ChildFailedError" not in err
    (step,) = [p for p in (run / "finetune").iterdir() if p.name.startswith("step-")]  # one checkpoint, whole
    assert not step.name.endswith(".tmp") and f"resume with: tinylmm train --resume {run}" in err
    saved = (run / "config.yaml").read_text()
    assert re.search(r"micro_batch_size: 4 +# 8 -> 4, so that 4 x 2 processes", saved)
    proc = subprocess.run(
        [*launch, "train", "--resume", str(run), "--no-eval"], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = " ".join(proc.stderr.split())  # rich wraps long paths: check the step, not the path
    assert "stage finetune: resuming from" in out and f"(step {int(step.name.split('-')[1])})" in out
    a, b = losses_of(ref), losses_of(run)
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(b) == 2 + 2 + 60
    assert max(abs(x[2] - y[2]) for x, y in zip(a, b)) < 1e-4  # 2 processes, resumed: 1 process's losses
    # A bad setting: one error line (the main process's), its exit code, no launcher traceback.
    bad = TINY + ["stages.finetune.lr=fast", "-o", str(tmp_path / "bad")]
    proc = subprocess.run([*launch, *cmd[i:], *bad], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.count("error: ") == 1 and "stages.finetune.lr" in proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_launch_needs_a_command_and_a_process_count(monkeypatch, capsys):
    assert _cli(monkeypatch, "launch", "--num_processes", "2") == 2
    assert "no tinylmm command to launch" in capsys.readouterr().err
    assert _cli(monkeypatch, "launch", "train", "--recipe", "base") == 2
    assert "--num_processes" in capsys.readouterr().err
