"""Instructization (tinylmm/data/instructize.py): records -> LLaVA conversations."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tinylmm.api.data import instructize_file
from tinylmm.data.instructize import InstructOptions, instructize, load_templates, read_records
from tinylmm.errors import ConfigError, DataError
from tinylmm.resources import asset

SHORT = "Answer the question using a single word or phrase."


def vqa_records():
    return [
        {"id": "q1", "image": "a.png", "question": "What color is the cube?", "answer": "red"},
        {"id": "q2", "image": "a.png", "question": "what  color is the cube", "answer": "Red"},
        {"id": "q3", "image": "a.png", "question": "How many balls?", "answer": "red"},
        {"id": "q4", "image": "b.png", "question": "Is there a cone?", "answer": "no"},
    ]


def humans(sample):
    return [t["value"] for t in sample["conversations"] if t["from"] == "human"]


def gpts(sample):
    return [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]


def test_vqa_single_turn_with_the_first_template():
    samples, report = instructize(vqa_records(), InstructOptions(task="vqa", diversity="single"))
    assert [s["id"] for s in samples] == ["q1", "q2", "q3", "q4"]
    assert samples[0] == {
        "id": "q1",
        "image": "a.png",
        "conversations": [
            {
                "from": "human",
                "value": "<image>\nWhat color is the cube?\nAnswer the question using a single word or phrase.",
            },
            {"from": "gpt", "value": "red"},
        ],
    }
    assert (report.records, report.conversations, report.pairs, report.duplicates) == (4, 4, 4, [])


def test_merging_an_images_pairs_deduplicates_by_normalised_question():
    samples, report = instructize(vqa_records(), InstructOptions(task="vqa", diversity="single", turns=0))
    assert [s["id"] for s in samples] == ["q1", "q4"]
    first = samples[0]
    assert first["image"] == "a.png"
    assert [h.split("\n")[0] for h in humans(first)] == ["<image>", "How many balls?"]  # q2 dropped
    assert "<image>" not in humans(first)[1]  # the image opens the first turn only
    assert gpts(first) == ["red", "red"]
    assert report.duplicates == ["q2"] and report.pairs == 3


def test_dedup_by_answer_and_none():
    samples, report = instructize(vqa_records(), InstructOptions(task="vqa", turns=0, dedup="answer"))
    assert len(samples[0]["conversations"]) == 2 and report.duplicates == ["q2", "q3"]  # "Red" ~ "red"
    samples, report = instructize(vqa_records(), InstructOptions(task="vqa", turns=0, dedup="none"))
    assert len(samples[0]["conversations"]) == 6 and report.duplicates == []


def test_dedup_only_when_pairs_are_merged():
    # single-turn conversations are never compared with each other (Honeybee's finalize_data)
    samples, report = instructize(vqa_records(), InstructOptions(task="vqa", turns=1, dedup="question"))
    assert len(samples) == 4 and report.duplicates == []


def test_turns_splits_an_images_pairs_into_conversations():
    records = [{"id": f"q{i}", "image": "a.png", "question": f"Q{i}?", "answer": "x"} for i in range(5)]
    samples, _ = instructize(records, InstructOptions(task="vqa", turns=2))
    assert [s["id"] for s in samples] == ["q0", "q2", "q4"]
    assert [len(s["conversations"]) for s in samples] == [4, 4, 2]
    assert all(humans(s)[0].startswith("<image>\n") for s in samples)


def test_multiple_templates_are_drawn_from_the_seed():
    records = [{"id": i, "image": f"{i}.png", "question": f"Q{i}?", "answer": "x"} for i in range(40)]
    one = instructize(records, InstructOptions(task="vqa", seed=1))[0]
    again = instructize(records, InstructOptions(task="vqa", seed=1))[0]
    other = instructize(records, InstructOptions(task="vqa", seed=2))[0]
    assert one == again and one != other
    used = {humans(s)[0].replace(f"Q{s['id']}?", "{q}") for s in one}
    assert len(used) == len(load_templates("vqa").templates)  # every template shows up in 40 draws
    single = instructize(records, InstructOptions(task="vqa", diversity="single", seed=2))[0]
    assert len({humans(s)[0].replace(f"Q{s['id']}?", "{q}") for s in single}) == 1


def test_input_inversion():
    samples, report = instructize(vqa_records()[:1], InstructOptions(task="vqa", invert=1.0, diversity="single"))
    assert humans(samples[0]) == ['<image>\nAsk a question about the image whose answer is "red".']
    assert gpts(samples[0]) == ["What color is the cube?"] and report.inverted == 1
    records = [{"id": i, "image": f"{i}.png", "question": "Q?", "answer": "x"} for i in range(200)]
    _, report = instructize(records, InstructOptions(task="vqa", invert=0.25))
    assert 30 <= report.inverted <= 70  # about a quarter
    with pytest.raises(ConfigError, match="no 'inverted' templates"):
        instructize([{"caption": "a red cube"}], InstructOptions(task="caption", invert=0.5))


def test_multiple_choice_answers_by_index_letter_or_text():
    base = {"image": "a.png", "question": "Which shape?", "choices": ["cube", "ball", "cone"]}
    records = [base | {"id": "i", "answer": 1}, base | {"id": "l", "answer": "b"}, base | {"id": "t", "answer": "ball"}]
    samples, _ = instructize(records, InstructOptions(task="mcvqa", diversity="single"))
    for s in samples:
        assert humans(s) == [
            "<image>\nWhich shape?\nA. cube\nB. ball\nC. cone\n"
            "Answer with the option's letter from the given choices directly."
        ]
        assert gpts(s) == ["B"]
    with pytest.raises(DataError, match=r"record bad: answer 'sphere' is neither"):
        instructize([base | {"id": "bad", "answer": "sphere"}], InstructOptions(task="mcvqa"))
    with pytest.raises(DataError, match=r"record far: answer '7' is out of range for 3 choices"):
        instructize([base | {"id": "far", "answer": 7}], InstructOptions(task="mcvqa"))


def test_shuffled_choices_keep_the_answer():
    records = [
        {"id": i, "image": f"{i}.png", "question": "Q?", "choices": ["w", "x", "y", "z"], "answer": "y"}
        for i in range(30)
    ]
    samples, _ = instructize(records, InstructOptions(task="mcvqa", shuffle_choices=True, diversity="single"))
    letters = set()
    for s in samples:
        options = dict(line.split(". ", 1) for line in humans(s)[0].split("\n")[2:6])
        assert options[gpts(s)[0]] == "y"
        letters.add(gpts(s)[0])
    assert len(letters) > 1  # the right option moved around


def test_boxes_normalised_from_coco_pixels(tmp_path):
    rec = {"id": "r", "image": "a.png", "phrase": "the red cube", "bbox": [10, 20, 30, 40], "width": 100, "height": 200}
    samples, _ = instructize([rec], InstructOptions(task="rec", diversity="single"))
    assert gpts(samples[0]) == ["[0.100,0.100,0.400,0.300]"]
    xyxy = InstructOptions(task="rec", bbox_format="xyxy", diversity="single")
    samples, _ = instructize([rec | {"bbox": [10, 20, 40, 60]}], xyxy)
    assert gpts(samples[0]) == ["[0.100,0.100,0.400,0.300]"]
    norm = InstructOptions(task="rec", bbox_format="xyxy_norm", diversity="single")
    samples, _ = instructize([rec | {"bbox": [0.1, 0.1, 0.4, 0.3]}], norm)
    assert gpts(samples[0]) == ["[0.100,0.100,0.400,0.300]"]
    with pytest.raises(DataError, match=r"record r: bbox \[10, 20, 300, 40\] \(xywh\) is not inside the image"):
        instructize([rec | {"bbox": [10, 20, 300, 40]}], InstructOptions(task="rec"))
    # no width/height: the size is read from the image folder
    (tmp_path / "img").mkdir()
    Image.new("RGB", (100, 200)).save(tmp_path / "img" / "a.png")
    src = tmp_path / "rec.jsonl"
    src.write_text(json.dumps({k: v for k, v in rec.items() if k not in ("width", "height")}) + "\n")
    out, _ = instructize_file(
        src, tmp_path / "out.json", InstructOptions(task="rec", diversity="single"), images=tmp_path / "img"
    )
    assert gpts(json.loads(out.read_text())[0]) == ["[0.100,0.100,0.400,0.300]"]
    with pytest.raises(DataError, match="record r: a pixel bbox needs the image size"):
        instructize_file(src, tmp_path / "out2.json", InstructOptions(task="rec"))


def test_fine_grained_templates_per_dataset():
    samples, _ = instructize(vqa_records()[:1], InstructOptions(task="vqa", granularity="fine", dataset="ocrvqa"))
    assert "reading the text in the image" in humans(samples[0])[0]
    with pytest.raises(ConfigError, match="unknown dataset .* 'ocrvq' \\(did you mean 'ocrvqa'\\?\\)"):
        instructize(vqa_records(), InstructOptions(task="vqa", granularity="fine", dataset="ocrvq"))
    with pytest.raises(ConfigError, match="granularity 'fine' needs a dataset name"):
        instructize(vqa_records(), InstructOptions(task="vqa", granularity="fine"))


def test_text_only_records_have_no_image_token():
    samples, _ = instructize(
        [{"question": "What is 2+2?", "answer": "4"}], InstructOptions(task="vqa", diversity="single")
    )
    assert "image" not in samples[0] and not humans(samples[0])[0].startswith("<image>")
    assert samples[0]["id"] == "input-0"


def test_user_templates_file_and_its_errors(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text('task: vqa\ntemplates:\n  - {input: "Q: {question}", target: "A: {answer}"}\n')
    samples, _ = instructize(vqa_records()[:1], InstructOptions(task="vqa", templates=str(good)))
    assert humans(samples[0]) == ["<image>\nQ: What color is the cube?"] and gpts(samples[0]) == ["A: red"]
    bad = tmp_path / "bad.yaml"
    bad.write_text('task: vqa\ntemplates:\n  - {input: "{questoin}", target: "{answer}"}\n')
    with pytest.raises(DataError, match=r"uses '\{questoin\}' \(did you mean 'question'\?\)"):
        instructize(vqa_records(), InstructOptions(task="vqa", templates=str(bad)))
    bad.write_text('task: vqa\ntemplate:\n  - {input: "{question}", target: "{answer}"}\n')
    with pytest.raises(DataError, match=r"unknown key 'template' .*did you mean 'templates'"):
        instructize(vqa_records(), InstructOptions(task="vqa", templates=str(bad)))
    bad.write_text('task: caption\ntemplates:\n  - {input: "x", target: "{caption}"}\n')
    with pytest.raises(DataError, match="is for task 'caption', not 'vqa'"):
        instructize(vqa_records(), InstructOptions(task="vqa", templates=str(bad)))


def test_shipped_template_files_load():
    for task in ("vqa", "mcvqa", "caption", "rec"):
        tset = load_templates(task)
        assert tset.templates and tset.task == task


def test_csv_input_with_field_names_and_missing_fields(tmp_path):
    src = tmp_path / "mc.csv"
    src.write_text("qid,img,Question,options,label\n7,a.png,Which?,cube|ball,1\n8,b.png,,cube|ball,0\n")
    records = read_records(src)
    options = InstructOptions(
        task="mcvqa",
        fields={"question": "Question", "choices": "options", "answer": "label"},
        image_field="img",
        id_field="qid",
    )
    with pytest.raises(
        DataError, match=r"1 record\(s\) cannot be instructized: record 8: no 'Question' \(the question field\)"
    ):
        instructize(records, options)
    samples, _ = instructize(records[:1], options)
    assert samples[0]["id"] == "7" and samples[0]["image"] == "a.png" and gpts(samples[0]) == ["B"]


def test_options_are_checked():
    with pytest.raises(ConfigError, match=r"unknown instructize task 'vq' \(did you mean 'vqa'\?\)"):
        InstructOptions(task="vq")
    with pytest.raises(ConfigError, match="unknown key 'turn' in stages.finetune.data.instructize .*'turns'"):
        InstructOptions.from_dict({"task": "vqa", "turn": 2}, "stages.finetune.data.instructize")
    with pytest.raises(ConfigError, match="invert must be a fraction"):
        InstructOptions(task="vqa", invert=2)
    with pytest.raises(ConfigError, match=r"unknown field of task 'vqa' 'choices'"):
        InstructOptions(task="vqa", fields={"choices": "c"})


def test_a_failed_write_keeps_the_earlier_file(tmp_path, monkeypatch):
    src = tmp_path / "q.json"
    src.write_text(json.dumps({"data": vqa_records()}))
    out = tmp_path / "out.json"
    out.write_text("earlier")
    with pytest.raises(DataError):
        instructize_file(src, out, InstructOptions(task="mcvqa"))  # vqa records lack choices
    assert out.read_text() == "earlier"
    with pytest.raises(DataError, match="is the input file"):
        instructize_file(src, src, InstructOptions(task="vqa"))
    path, report = instructize_file(src, out, InstructOptions(task="vqa"))
    assert len(json.loads(path.read_text())) == 4 and report.conversations == 4


def test_ls_and_cp_the_shipped_template_files(tmp_path):
    from tinylmm import api

    rows = dict(api.listing("instruct"))
    assert set(rows) == {"instruct-vqa", "instruct-mcvqa", "instruct-caption", "instruct-rec"}
    assert rows["instruct-vqa"].startswith("Instruction templates for open-ended VQA")
    kind, path = api.copy_shipped("instruct-rec", tmp_path)
    assert kind == "instruction templates" and path == tmp_path / "rec.yaml"
    assert path.read_text() == asset("instruct").joinpath("rec.yaml").read_text()
    assert load_templates("rec", path).templates == load_templates("rec").templates
    with pytest.raises(FileExistsError, match="already exists"):
        api.copy_shipped("instruct-rec", tmp_path)


def test_the_cli_command(tmp_path):
    from typer.testing import CliRunner

    from tinylmm.cli.app import app

    src = tmp_path / "vqa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in vqa_records()))
    out = tmp_path / "llava.json"
    args = ["data", "instructize", str(src), "--task", "vqa", "--turns", "0", "--diversity", "single"]
    args += ["--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "4 records -> 2 conversations of 3 QA pairs (1 duplicate pair dropped, 0 inverted)" in result.output
    assert [s["id"] for s in json.loads(out.read_text())] == ["q1", "q4"]
    result = CliRunner().invoke(app, [*args[:-2], "--out", str(tmp_path / "x.json"), "--field", "question"])
    assert result.exit_code != 0 and "--field takes FIELD=KEY" in str(result.exception or result.output)
