"""The console script: fast help, thin commands, clear errors with exit code 2."""

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY, tiny_stages

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def tinylmm(*args, input=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tinylmm.cli.app", *args],
        capture_output=True,
        text=True,
        env=ENV,
        input=input,
        cwd=cwd,
        timeout=300,
    )


def test_help_does_not_import_the_ml_stack():
    code = "import sys, tinylmm.cli.app; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], env=ENV).returncode == 0
    out = tinylmm("--help")
    assert out.returncode == 0
    for cmd in ("train", "chat", "eval", "ls", "cp"):
        assert cmd in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--preset", "toi"], "did you mean 'toy'"),
        (["train", "--recipe", "shar"], "did you mean 'share'"),
        (["train", "stages.finetune.lrr=1"], "did you mean 'lr'"),
        (["train", "model.connector.type=mlp"], "unknown connector"),
        (["ls", "preset"], "did you mean 'presets'"),
        (["chat", "no/such/dir", "hi"], "not a tinylmm checkpoint"),
    ],
)
def test_user_errors_exit_2_with_one_clear_line(args, message, tmp_path):
    out = tinylmm(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing written on a config error


def test_missing_dataset_names_the_file(tmp_path):
    out = tinylmm(
        "train", "--preset", "toy", "stages.pretrain.data={json: nowhere.json, images: .}", *TINY, cwd=tmp_path
    )
    assert out.returncode == 2 and "nowhere.json" in out.stderr


def test_ls_and_cp(tmp_path):
    for kind, name in [
        ("presets", "toy"),
        ("recipes", "share"),
        ("connectors", "resampler"),
        ("templates", "pretrain"),
        ("accelerate", "fsdp2"),
    ]:
        out = tinylmm("ls", kind)
        assert out.returncode == 0 and name in out.stdout
    out = tinylmm("cp", "base", str(tmp_path / "mine.yaml"))
    assert out.returncode == 0 and (tmp_path / "mine.yaml").exists()
    assert tinylmm("cp", "base", str(tmp_path / "mine.yaml")).returncode == 2
    out = tinylmm("cp", "deepspeed-zero3-offload", str(tmp_path))
    assert out.returncode == 0 and "tinylmm launch --config_file" in " ".join(out.stdout.split())
    assert (tmp_path / "deepspeed-zero3-offload.yaml").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    out = tinylmm("train", "-o", str(run), *TINY, *tiny_stages(steps=2))
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_train_prints_where_the_model_is(trained):
    assert (trained / "final" / "tinylmm.json").exists()
    assert (trained / "metrics.jsonl").read_text().count("\n") == 6


def test_chat_one_question_and_interactive(trained, tmp_path):
    img = next((trained / "data" / "shapes" / "images").glob("eval-*.png"))
    out = tinylmm(
        "chat", str(trained / "final"), "--image", str(img), "--max-new-tokens", "4", "What color is the circle?"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()  # an (untrained, so arbitrary) answer was streamed
    session = f"/image {img}\nWhat color is the circle?\n/image nowhere.png\n/reset\nHow many shapes?\n/quit\n"
    out = tinylmm("chat", str(trained / "final"), "--max-new-tokens", "3", input=session)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("bot>") == 2 and "does not exist" in out.stdout


def test_eval_writes_json(trained, tmp_path):
    out = tinylmm("eval", str(trained / "final"), "--bench", "shapes", "--out", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n"] == len(result["predictions"]) == 12 + 3 * 6  # and POPE's 3 splits of one image
    assert set(result["by_type"]) == {"color", "shape", "count", "position", "relation", "exist"}
    assert set(result["pope"]) == {"random", "popular", "adversarial"}
    assert 0 <= result["accuracy"] <= 1 and 0 < result["chance"] < 1
