"""Mixtures (tinylmm/data/mixture.py): Honeybee's balancing resolved to exact counts."""

from __future__ import annotations

from collections import Counter

import pytest

from tinylmm.data.mixture import MixtureDataset, Part, check_balance, draw, resolve_counts, shares
from tinylmm.errors import ConfigError

PARTS = [Part("vqa-a", "vqa", 600), Part("vqa-b", "vqa", 200), Part("cap", "caption", 100), Part("rec", "rec", 100)]


def test_per_dataset_is_uniform_over_datasets():
    assert shares(PARTS, "per-dataset") == [0.25] * 4
    assert resolve_counts(PARTS, "per-dataset") == [250, 250, 250, 250]  # epoch = 1000 samples


def test_per_task_is_uniform_over_tasks_and_by_size_within_one():
    assert shares(PARTS, "per-task") == pytest.approx([0.25, 1 / 12, 1 / 3, 1 / 3])
    counts = resolve_counts(PARTS, "per-task")
    assert sum(counts) == 1000 and counts == [250, 84, 333, 333]  # 83.33, 333.33 x2: the first tie wins


def test_per_sample_caps_each_dataset():
    assert resolve_counts(PARTS, "per-sample", cap=150) == [150, 150, 100, 100]
    assert resolve_counts(PARTS, "per-sample") == [600, 200, 100, 100]
    assert shares(PARTS, "per-sample", cap=150) == pytest.approx([0.3, 0.3, 0.2, 0.2])


def test_hand_tuned_weights_and_max_samples():
    parts = [Part("a", "vqa", 600, weight=3), Part("b", "vqa", 200, weight=1, max_samples=100)]
    assert shares(parts, "weights") == [0.75, 0.25]
    assert resolve_counts(parts, "weights") == [525, 175]  # epoch = 600 + 100 kept


def test_draw_is_a_seeded_permutation_repeated_as_needed():
    once = draw(10, 10, None, seed=0, index=1)
    assert sorted(once) == list(range(10)) and once == draw(10, 10, None, seed=0, index=1)
    assert once != draw(10, 10, None, seed=1, index=1)
    twice = draw(10, 25, None, seed=0, index=1)
    assert Counter(Counter(twice).values()) == {3: 5, 2: 5}  # every sample twice, half of them thrice
    kept = draw(10, 12, 4, seed=0, index=1)
    assert len(set(kept)) == 4 and len(kept) == 12  # max_samples: 4 samples, repeated


class Numbers:
    def __init__(self, tag, n):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return (self.tag, i)

    def num_supervised(self, i):
        return i


def test_mixture_dataset_gives_the_counts_it_promises():
    datasets = [Numbers("a", 30), Numbers("b", 5)]
    parts = [Part("a.json", "vqa", 30), Part("b.json", "caption", 5)]
    mix = MixtureDataset(datasets, parts, "per-dataset", None, seed=3)
    tags = Counter(mix[i][0] for i in range(len(mix)))
    assert len(mix) == 35 and tags == {"a": 18, "b": 17}  # 17.5 each; the tie goes to the first
    assert {mix[i] for i in range(len(mix)) if mix[i][0] == "b"} == {("b", j) for j in range(5)}
    again = MixtureDataset(datasets, parts, "per-dataset", None, 3)
    assert [mix[i] for i in range(35)] == [again[i] for i in range(35)]
    resolved = mix.resolved()
    assert [d["count"] for d in resolved["datasets"]] == [18, 17] and resolved["total"] == 35
    assert mix.summary() == "mixture, balance per-dataset: a.json (vqa) 18, b.json (caption) 17"


def test_options_that_would_be_ignored_are_errors():
    check_balance("weights", None, [1.0, 2.0], "stages.finetune.data")
    with pytest.raises(ConfigError, match=r"unknown balance in stages.x.data 'per-tsk' \(did you mean 'per-task'\?\)"):
        check_balance("per-tsk", None, [None], "stages.x.data")
    with pytest.raises(ConfigError, match="a cap .* belongs to balance 'per-sample' only"):
        check_balance("per-dataset", 100, [None], "stages.x.data")
    with pytest.raises(ConfigError, match="'weight' is used only with balance 'weights'"):
        check_balance("per-task", None, [2.0, None], "stages.x.data")
    with pytest.raises(ConfigError, match=r"needs a weight on every dataset; datasets\[1\] lack one"):
        check_balance("weights", None, [2.0, None], "stages.x.data")


def test_a_stage_trains_on_an_instructized_mixture(tmp_path):
    """A finetune stage over two datasets: the shapes world's conversations and a VQA file
    instructized on the fly, balanced per task; the counts are those promised and saved."""
    import json

    from tinylmm import api
    from tinylmm.data.shapes import write_shapes_dataset

    from conftest import TINY, tiny_stages

    paths = write_shapes_dataset(tmp_path / "shapes", n_caption=8, n_instruct=12, n_eval=4, n_pope=1, image_size=32)
    images = json.loads(paths["instruct"].read_text())
    vqa = tmp_path / "vqa.jsonl"
    rows = [{"id": f"v{i}", "image": s["image"], "question": "What?", "answer": "it"} for i, s in enumerate(images[:6])]
    vqa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = (
        f"stages.finetune.data={{balance: per-task, datasets: ["
        f"{{json: {paths['instruct']}, images: {paths['images']}, task: conversation}},"
        f"{{json: {vqa}, images: {paths['images']}, task: vqa, instructize: {{task: vqa, diversity: single}}}}]}}"
    )
    result = api.train_run(
        "toy",
        "share",
        [*TINY, *tiny_stages(("pretrain", "share", "finetune"), steps=1), data],
        output_dir=tmp_path / "run",
        evaluate=False,
    )
    run = result.run_dir
    resolved = json.loads((run / "data" / "finetune-mixture.json").read_text())
    assert resolved["balance"] == "per-task" and resolved["total"] == 18  # 12 + 6: the epoch of both
    counts = [(d["task"], d["usable"], d["count"]) for d in resolved["datasets"]]
    assert counts == [("conversation", 12, 9), ("vqa", 6, 9)]
    converted = json.loads((run / "data" / "stages.finetune.data.datasets[1]-instructized.json").read_text())
    assert converted[0]["conversations"][0]["value"].startswith("<image>\nWhat?\nAnswer the question")
    with pytest.raises(ConfigError, match="'weight' is used only with balance 'weights'"):
        api.resolve_config("toy", "share", [*TINY, data.replace("task: vqa,", "task: vqa, weight: 2,")])


@pytest.mark.parametrize(
    "data, message",
    [
        ("{shapes: instruct, instructize: {task: vqa}}", r"instructize converts the records of 'json'"),
        ("{json: a.json, instructize: {task: vqa, turn: 2}}", "unknown key 'turn' in stages.finetune.data.instr"),
        ("{json: a.json, balance: per-task}", r"stages.finetune.data.balance balances a mixture: it needs 'datasets'"),
        ("{json: a.json, datasets: [{json: b.json}]}", "give exactly one of 'json'"),
        ("{datasets: [{json: b.json}], balance: per-task}", r"\[0\] \(b.json\): balance 'per-task' needs its 'task'"),
        ("{datasets: [{json: b.json, max_samples: 0}]}", r"datasets\[0\].max_samples=0 must be >= 1"),
        ("{datasets: [{json: b.json, task: x}], balance: per-sample, cap: 0}", "a cap .* belongs to"),
        ("{datasets: [{jsn: b.json}]}", "jsn"),
    ],
)
def test_stage_data_options_are_checked(data, message):
    from tinylmm import api

    from conftest import TINY

    with pytest.raises(ConfigError, match=message):
        api.resolve_config("toy", "share", [*TINY, f"stages.finetune.data={data}"])
