"""Checking data before and while training: `tinylmm data check` names every bad sample by id
and reason (and writes the usable subset), `train` runs the same checks at its start, an image
that fails mid-run is replaced deterministically and recorded, too many stop the run with a
checkpoint, and image paths stay inside the image folder unless allowed."""

import io
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tinylmm.cli.app import app
from tinylmm.cli.errors import run_cli
from tinylmm.config import ConfigError, resolve
from tinylmm.data.images import UnreadableImage
from tinylmm.data.llava import LlavaDataset
from tinylmm.errors import DataError
from tinylmm.models.assemble import build_model
from tinylmm.train.bad_images import SKIP_REPORT, BadImages, Failure, SkipLog
from tinylmm.train.loop import train
from tinylmm.train.progress import Reporter

from conftest import TINY
from test_models import spec


def _cli(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["tinylmm", *argv])
    code = run_cli(app)
    out = capsys.readouterr()
    return code, out.out, " ".join(out.err.split())


def _noise_png(size=32, seed=0) -> bytes:
    rng = random.Random(seed)
    im = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _conv(q="<image>\nWhat color is the circle?", a="red"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture
def bad_data(tmp_path):
    """A file with one sample of every kind of fault, and three usable ones."""
    img = tmp_path / "img"
    img.mkdir()
    (img / "a.png").write_bytes(_noise_png())
    (img / "cut.png").write_bytes(_noise_png()[:1500])  # exists, truncated
    (img / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "outside.png").write_bytes(_noise_png())
    samples = [
        {"id": "good", "image": "a.png", "conversations": _conv()},
        {"id": "text", "conversations": _conv("Say hi", "hi")},
        {"id": "noconv"},
        "not an object",
        {"id": "order", "conversations": [*_conv("a", "b")[:1], *_conv("c", "d")]},
        {"id": "badimg", "image": 5, "conversations": _conv()},
        {"id": "dotdot", "image": "../outside.png", "conversations": _conv()},
        {"id": "abs", "image": str(tmp_path / "outside.png"), "conversations": _conv()},
        {"id": "missing", "image": "nope.png", "conversations": _conv()},
        {"id": "count", "image": "a.png", "conversations": _conv("<image><image>\nx")},
        {"id": "cut", "image": "cut.png", "conversations": _conv()},
        {"id": "garbage", "image": "garbage.png", "conversations": _conv()},
        {"id": "empty", "image": "a.png", "conversations": _conv(a=" ")},
        {"id": "nolabel", "image": "a.png", "conversations": _conv(q="<image>\n" + "a question " * 80)},
        {"id": "long", "image": "a.png", "conversations": _conv(a="red " * 400)},  # cut at max_len: usable
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    return path, img, samples


EXPECTED = {  # reason -> the ids it must name
    "bad conversation": ["noconv", "#3"],
    "bad turn order": ["order"],
    "bad image": ["badimg"],
    "outside image folder": ["dotdot", "abs"],
    "missing image": ["missing"],
    "image count mismatch": ["count"],
    "unreadable image": ["cut", "garbage"],
    "empty answer": ["empty"],
    "no supervised tokens": ["nolabel"],
}


def _rows(out: str) -> dict[str, str]:
    """The report table's rows: reason -> the rest of its line."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) >= 3 and cells[0] in EXPECTED:
            rows[cells[0]] = "│".join(cells[1:])
    return rows


def test_data_check_names_every_bad_sample_by_id_and_writes_the_usable_ones(bad_data, tmp_path, monkeypatch, capsys):
    path, img, samples = bad_data
    usable = tmp_path / "usable.json"
    code, out, _ = _cli(
        monkeypatch, capsys, "data", "check", str(path), "--images", str(img), "--max-len", "128",
        "--workers", "2", "--write-usable", str(usable),
    )  # fmt: skip
    assert code == 1
    assert "3 of 15 samples usable (template llama, max_len 128)" in out
    rows = _rows(out)
    assert set(rows) == set(EXPECTED)
    for reason, ids in EXPECTED.items():
        count, listed = rows[reason].split("│")[:2]
        assert int(count) == len(ids) and [i.strip() for i in listed.split(",")] == ids, (reason, rows[reason])
    assert "1 sample reaches max_len 128 and is cut there (still usable): long" in out
    assert json.loads(usable.read_text()) == [samples[0], samples[1], samples[-1]]  # as written, in file order
    # allowed outside paths make those two usable; the usable file alone checks clean
    code, out, _ = _cli(
        monkeypatch, capsys, "data", "check", str(path), "--images", str(img), "--max-len", "128",
        "--allow-outside-paths",
    )  # fmt: skip
    assert "5 of 15 samples usable" in out and "outside image folder" not in _rows(out)
    code, out, _ = _cli(monkeypatch, capsys, "data", "check", str(usable), "--images", str(img), "--max-len", "512")
    assert code == 0 and "3 of 3 samples usable" in out
    # never over the file itself; a file that is not a list of samples names the file
    code, _, err = _cli(
        monkeypatch, capsys, "data", "check", str(path), "--images", str(img), "--write-usable", str(path)
    )
    assert code == 2 and "is the file being checked" in err and json.loads(path.read_text()) == samples
    (tmp_path / "obj.json").write_text("{}")
    code, _, err = _cli(monkeypatch, capsys, "data", "check", str(tmp_path / "obj.json"), "--images", str(img))
    assert code == 2 and "obj.json' must hold a JSON list" in err


@pytest.fixture(scope="module")
def proc():
    return build_model(spec())[1]


def test_outside_paths_are_refused_unless_allowed_and_symlinks_inside_are_followed(proc, tmp_path):
    img = tmp_path / "img"
    (img / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.png").write_bytes(_noise_png())
    (img / "linked").symlink_to(tmp_path / "elsewhere")  # a folder linked in, as data/coco often is
    (img / "sub" / "a.png").write_bytes(_noise_png())
    samples = [
        {"id": "up", "image": "../elsewhere/x.png", "conversations": _conv()},
        {"id": "abs", "image": str(tmp_path / "elsewhere" / "x.png"), "conversations": _conv()},
        {"id": "inside", "image": "sub/../sub/a.png", "conversations": _conv()},
        {"id": "link", "image": "linked/x.png", "conversations": _conv()},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(samples))
    ds = LlavaDataset(path, img, proc, proc.get_template("llama"), 256)
    assert [ds.sample_id(i) for i in range(len(ds))] == ["inside", "link"]
    assert [(sid, r.split(":")[0]) for sid, r in ds.report.skipped] == [
        ("up", "outside image folder"),
        ("abs", "outside image folder"),
    ]
    ds = LlavaDataset(path, img, proc, proc.get_template("llama"), 256, allow_outside_paths=True)
    assert [ds.sample_id(i) for i in range(len(ds))] == ["up", "abs", "inside", "link"]


# --------------------------------------------------------------------------- while training

BAD = ("s03", "s09")  # the samples whose images are truncated PNGs


def _train_data(tmp_path, n=16):
    img = tmp_path / "img"
    img.mkdir()
    samples = []
    for i in range(n):
        sid = f"s{i:02d}"
        data = _noise_png(seed=i)
        (img / f"{sid}.png").write_bytes(data[:1500] if sid in BAD else data)
        answer = ["red", "blue", "green", "yellow"][i % 4]
        samples.append({"id": sid, "image": f"{sid}.png", "conversations": _conv(a=answer)})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    return path, img


def _recipe(tmp_path, data, img, epochs=2):
    recipe = tmp_path / "one.yaml"
    recipe.write_text(
        "stages:\n  finetune:\n"
        f"    data: {{json: {data}, images: {img}}}\n"
        "    tune: {vision: frozen, connector: full, llm: full}\n"
        f"    lr: 1.0e-3\n    batch_size: 4\n    micro_batch_size: 2\n    epochs: {epochs}\n    max_len: 128\n"
    )
    return str(recipe)


def _losses(run):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "step" in r]


def _skips(run):
    return [json.loads(line) for line in (run / SKIP_REPORT).read_text().splitlines()]


@pytest.mark.slow
def test_an_image_that_fails_mid_run_is_replaced_recorded_and_resumes_in_the_same_order(tmp_path, monkeypatch):
    data, img = _train_data(tmp_path)
    recipe = _recipe(tmp_path, data, img)
    overrides = TINY + ["data.max_bad_images=2"]
    ref = tmp_path / "ref"
    cfg, sources = resolve("toy", recipe, overrides, output_dir=str(ref))
    train(cfg, sources, evaluate=False)
    losses = _losses(ref)
    assert len(losses) == 8 and all(l == l for _, l in losses)  # every step ran, finite
    records = _skips(ref)
    assert all(r["when"] == "training" and r["reason"] == "unreadable image" for r in records)
    for epoch in (range(1, 5), range(5, 9)):  # each bad sample met in each epoch (a replacement may be bad too)
        assert {r["id"] for r in records if r["step"] in epoch} == set(BAD)
    assert all(r["image"].endswith(f"{r['id']}.png") and r["replaced_by"] not in BAD for r in records)

    # interrupted at step 5 (after the first epoch's failures), then resumed: the same order
    run = tmp_path / "run"
    report = Reporter.step

    def step_then_sigint(self, name, index, done, *args):
        report(self, name, index, done, *args)
        if done == 5:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Reporter, "step", step_then_sigint)
    cfg, sources = resolve("toy", recipe, overrides, output_dir=str(run))
    with pytest.raises(Exception, match="SIGINT: stopped at stage 'finetune' step 5/8"):
        train(cfg, sources, evaluate=False)
    monkeypatch.undo()
    train(resume_dir=run, evaluate=False)
    assert _losses(run) == losses
    assert _skips(run) == records  # the records past the checkpoint came again, once


@pytest.mark.slow
def test_more_bad_images_than_allowed_stop_with_a_checkpoint_naming_the_files(tmp_path, monkeypatch, capsys):
    data, img = _train_data(tmp_path)
    run = tmp_path / "run"
    argv = ["train", "--recipe", _recipe(tmp_path, data, img), "-o", str(run), "--no-eval", *TINY]
    # DataLoader workers: the failures come back from them with the batches
    code, _, err = _cli(monkeypatch, capsys, *argv, "data.max_bad_images=1", "train.num_workers=2")
    assert code == 2
    assert {r["id"] for r in _skips(run)} == set(BAD)  # stopped at the step the second one failed
    flat = "".join(err.split())  # rich folds long paths across lines

    def said(text):
        return "".join(text.split()) in flat

    assert said("2 images failed to decode while training, more than data.max_bad_images=1")
    assert all(said(f"{img / sid}.png (sample '{sid}')") for sid in BAD)
    assert said(f"the skip report is {run / SKIP_REPORT}")
    ckpt_dir = run / "finetune" / f"step-{max(r['step'] for r in _skips(run)):06d}"
    assert ckpt_dir.is_dir() and said(f"checkpoint {ckpt_dir}")
    assert said(f"resume with: tinylmm train --resume {run}")
    for sid in BAD:  # the files fixed, the run resumes to the end
        (img / f"{sid}.png").write_bytes(_noise_png())
    code, _, err = _cli(monkeypatch, capsys, "train", "--resume", str(run), "--no-eval")
    assert code == 0, err
    assert (run / "final" / "tinylmm.json").exists()


@pytest.mark.slow
def test_train_checks_at_its_start_decoding_with_verify_images_and_outside_paths(tmp_path):
    data, img = _train_data(tmp_path)
    samples = json.loads(data.read_text())
    samples[0]["image"] = str(img / "s00.png")  # absolute: refused by default
    data.write_text(json.dumps(samples))
    run = tmp_path / "run"
    overrides = TINY + ["data.verify_images=true", "stages.finetune.epochs=1"]
    cfg, sources = resolve("toy", _recipe(tmp_path, data, img), overrides, output_dir=str(run))
    train(cfg, sources, evaluate=False)
    assert [(r["when"], r["id"], r["reason"]) for r in _skips(run)] == [
        ("start", "s00", "outside image folder"),
        ("start", "s03", "unreadable image"),
        ("start", "s09", "unreadable image"),
    ]  # decoded at the start: nothing failed while training
    cfg, _ = resolve("toy", _recipe(tmp_path, data, img), ["data.allow_outside_paths=true"])
    assert cfg.data.allow_outside_paths


def test_settle_rescales_the_gradients_to_the_tokens_trained_on(tmp_path):
    class Accel:
        num_processes, device = 1, torch.device("cpu")

    class Data:
        report = type("R", (), {"source": "d.json"})()

    bad = BadImages(Accel(), SkipLog(tmp_path, True), "s", Data(), 0, limit=1, start_step=0)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 12.0)  # scaled for 10 planned tokens: a sum over them / 10
    assert bad.settle(10, [p]) == 10 and p.grad.tolist() == [12.0, 12.0]  # nothing failed
    bad.note([Failure(3, "x", "x.png", "OSError: truncated", "y", token_delta=2)])
    assert bad.settle(10, [p]) == 12  # the replacement has 2 supervised tokens more
    assert torch.allclose(p.grad, torch.full((2,), 10.0)) and not bad.over
    assert [r["id"] for r in _skips(tmp_path)] == ["x"]
    bad.note([Failure(4, "z", "z.png", "OSError", "y", 0)])
    bad.settle(10, [p])
    assert bad.over  # two distinct images, the limit is one


def test_an_unreadable_image_names_its_sample(proc, tmp_path):
    data, img = _train_data(tmp_path)
    ds = LlavaDataset(data, img, proc, proc.get_template("llama"), 256)
    with pytest.raises(UnreadableImage, match="sample 's03': cannot read image .*s03.png': OSError"):
        ds[3]
    assert isinstance(UnreadableImage("x", "y"), DataError)  # outside training: an error that exits 2


def test_the_data_keys_are_validated_and_merge_key_by_key():
    with pytest.raises(ConfigError, match="unknown key 'config.data.verify_image' .*did you mean 'verify_images'"):
        resolve("toy", "share", ["data.verify_image=true"])
    for value in ("1.5", "-1", ".nan"):
        with pytest.raises(ConfigError, match=f"data.max_bad_images={value.lstrip('.')}|max_bad_images=nan"):
            resolve("toy", "share", [f"data.max_bad_images={value}"])
    with pytest.raises(ConfigError, match="data.verify_images: expected true/false"):
        resolve("toy", "share", ["data.verify_images=3"])
    cfg, _ = resolve("toy", "share", ["data={max_bad_images: 5}", "data.verify_images=true"])
    assert (cfg.data.max_bad_images, cfg.data.verify_images, cfg.data.allow_outside_paths) == (5, True, False)
    assert resolve("toy", "share")[0].data.max_bad_images == 0.001


@pytest.mark.slow
def test_two_processes_replace_the_same_samples_as_one(tmp_path):
    """The replacement depends on the place in the global batch, not on the process: two
    processes train the one-process run's batches, and record the failures once."""
    data, img = _train_data(tmp_path)
    recipe = _recipe(tmp_path, data, img, epochs=1)
    overrides = TINY + ["data.max_bad_images=4"]
    ref = tmp_path / "ref"
    cfg, sources = resolve("toy", recipe, overrides, output_dir=str(ref))
    train(cfg, sources, evaluate=False)
    run = tmp_path / "run"
    launch = [sys.executable, "-m", "tinylmm.cli.app", "launch", "--num_processes", "2", "--main_process_port", "29563"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = ["train", "--recipe", recipe, "-o", str(run), "--no-eval", *overrides]
    proc = subprocess.run([*launch, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes: 2" in " ".join(proc.stderr.split())
    key = sorted((r["step"], r["id"], r["replaced_by"]) for r in _skips(ref))
    assert key and sorted((r["step"], r["id"], r["replaced_by"]) for r in _skips(run)) == key
    a, b = _losses(ref), _losses(run)
    assert [s for s, _ in a] == [s for s, _ in b] and max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4


def test_decoding_runs_in_as_many_processes_as_asked(tmp_path, monkeypatch):
    from tinylmm.data import check

    pools = []

    class Recorded(check.ProcessPoolExecutor):
        def __init__(self, workers, **kwargs):
            pools.append(workers)
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(check, "ProcessPoolExecutor", Recorded)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(_noise_png(seed=i)[: 1500 if i == 2 else None])
    progress = []
    assert list(check.find_unreadable(paths, 1)) == [paths[2]] and pools == []  # one: in this process
    assert list(check.find_unreadable(paths, 2, lambda done, total: progress.append((done, total)))) == [paths[2]]
    assert pools == [2] and progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
