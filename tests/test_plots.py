"""Pictures of a run: the loss/lr curves over the stages and the eval charts, drawn from
metrics.jsonl (by the loop, and again by `tinylmm plot RUN`)."""

import io
import json
import math
import sys

import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from tinylmm.cli.app import app
from tinylmm.cli.errors import run_cli
from tinylmm.errors import DataError
from tinylmm.train import plots
from tinylmm.train.progress import Reporter

SUMMARY = {
    "bench": "shapes",
    "n": 300,
    "accuracy": 0.9,
    "chance": 0.3,
    "by_type": {
        "color": {"n": 60, "accuracy": 1.0, "chance": 0.1667},
        "count": {"n": 120, "accuracy": 0.8, "chance": 0.25},
        "shape": {"n": 120, "accuracy": 0.95, "chance": 0.5},
    },
}
POPE = {
    split: {"n": 120, "accuracy": acc, "precision": 0.9, "recall": 0.8, "f1": 0.85, "yes_ratio": 0.45}
    for split, acc in (("random", 0.9), ("popular", 0.85), ("adversarial", 0.8))
}


def step(stage, index, n, loss=1.0, lr=1e-3):
    return {"stage": stage, "stage_index": index, "step": n, "loss": loss, "lr": lr, "grad_norm": 1.0, "tokens": 64}


def two_stages():
    return [step("pretrain", 0, i, loss=3.0 / i) for i in range(1, 6)] + [
        step("finetune", 1, i, loss=1.0 / i, lr=2e-5) for i in range(1, 4)
    ]


def write_run(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def assert_png(path, min_bytes=10_000):
    assert path.is_file() and path.stat().st_size > min_bytes
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_stages_are_laid_end_to_end_in_stage_order():
    records = [
        step("finetune", 2, 1),
        *[step("pretrain", 0, i) for i in range(1, 5)],
        {"eval": "shapes", **SUMMARY},  # not a step: ignored
        *[step("share", 1, i) for i in range(1, 4)],
        step("finetune", 2, 2),
    ]
    assert plots.stage_lengths(records) == {"pretrain": 4, "share": 3, "finetune": 2}
    assert plots.stage_offsets(records) == {"pretrain": 0, "share": 4, "finetune": 7}
    assert plots.stage_offsets([]) == {}


def test_redraw_draws_the_loss_and_each_evaluation(tmp_path):
    run = write_run(tmp_path / "run", [*two_stages(), {"eval": "shapes", **SUMMARY}])
    written = plots.redraw(run)
    assert written == [run / "plots" / "loss.png", run / "plots" / "eval-shapes.png"]
    for path in written:
        assert_png(path)


def test_a_nan_or_missing_loss_is_left_out_not_fatal(tmp_path):
    records = two_stages()
    records[1]["loss"] = float("nan")  # json writes NaN, as the step records do
    records[2]["loss"] = None
    run = write_run(tmp_path / "run", records)
    read = plots.read_metrics(run / "metrics.jsonl")
    assert math.isnan(read[1]["loss"]) and read[2]["loss"] is None
    assert_png(plots.draw_loss(read, tmp_path / "loss.png"))
    # a negative loss (not from our loop, but drawable): a linear axis, not a log one
    assert_png(plots.draw_loss([step("s", 0, 1, loss=-1.0), step("s", 0, 2, loss=2.0)], tmp_path / "neg.png"))


def test_eval_chart_with_and_without_pope(tmp_path):
    plain = assert_png(plots.draw_eval(SUMMARY, tmp_path / "plain.png"))
    with_pope = assert_png(plots.draw_eval({**SUMMARY, "pope": POPE}, tmp_path / "pope.png"))
    assert with_pope[1] > plain[1]  # the POPE panel below the per-type one
    # a benchmark with no question types and no chance level: the overall bar alone
    assert_png(plots.draw_eval({"bench": "x", "n": 5, "accuracy": 0.4}, tmp_path / "bare.png"), min_bytes=5_000)


def test_missing_or_bad_metrics_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "metrics.jsonl")):
        plots.redraw(tmp_path / "nowhere")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(step("s", 0, 1)) + "\n{oops\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl, line 2: not JSON"):
        plots.redraw(run)
    (run / "metrics.jsonl").write_text("[1, 2]\n")
    with pytest.raises(DataError, match="line 1: a record is a JSON object"):
        plots.read_metrics(run / "metrics.jsonl")


def test_cli_plot_redraws_and_a_missing_run_is_a_clean_error(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run", [*two_stages(), {"eval": "shapes", **SUMMARY, "pope": POPE}])
    runner = CliRunner()
    out = runner.invoke(app, ["plot", str(run)], env={"COLUMNS": "300"})
    assert out.exit_code == 0, out.output
    assert "loss.png" in out.output and "eval-shapes.png" in out.output
    assert_png(run / "plots" / "eval-shapes.png")

    assert runner.invoke(app, ["plot", str(tmp_path / "nowhere")]).exit_code != 0
    monkeypatch.setattr(sys, "argv", ["tinylmm", "plot", str(tmp_path / "nowhere")])
    monkeypatch.setenv("COLUMNS", "300")  # the message on one line
    assert run_cli(app) == 2  # the console script's exit: one red line, no traceback
    err = capsys.readouterr().err
    assert "nowhere" in err and "metrics.jsonl" in err and "Traceback" not in err


def reporter(tmp_path):
    out = io.StringIO()
    return Reporter(Console(file=out, width=200), True, tmp_path / "metrics.jsonl"), out


def test_the_eval_record_round_trips_through_metrics_jsonl(tmp_path):
    report, _ = reporter(tmp_path)
    pope = {**POPE, "random": {**POPE["random"], "precision": float("nan")}}  # no "yes" answered
    report.record_eval({**SUMMARY, "pope": pope, "predictions": [{"id": 1}]})
    line = (tmp_path / "metrics.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert record == {"eval": "shapes", **SUMMARY, "pope": {**pope, "random": {**pope["random"], "precision": None}}}
    assert plots.read_metrics(tmp_path / "metrics.jsonl") == [record]
    assert plots.redraw(tmp_path) == [tmp_path / "plots" / "eval-shapes.png"]  # no steps: no loss.png


def test_the_pope_table_and_a_failed_drawing_is_a_warning(tmp_path):
    report, out = reporter(tmp_path)
    report.eval_table(SUMMARY)
    assert "overall" in out.getvalue() and "yes-ratio" not in out.getvalue()
    report.eval_table({**SUMMARY, "pope": POPE})
    text = out.getvalue()
    assert "adversarial" in text and "yes-ratio" in text and "45.0%" in text and "85.0%" in text
    assert report.plot_eval({"bench": "broken"}, tmp_path / "plots" / "eval-broken.png") is None
    assert report.plot_loss(tmp_path / "plots" / "loss.png") is None  # no metrics.jsonl yet
    assert out.getvalue().count("could not draw") == 2
