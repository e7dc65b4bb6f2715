"""The lmms-eval plugin (tinylmm/api/lmms_eval_model.py): lmms-eval finds the chat model
`tinylmm` through the entry point, and `lmms-eval --model tinylmm --include_path DIR` scores a
tiny checkpoint on a local task (a task YAML over a JSON-lines file and PNGs the test writes)
to what the test predicts: the targets are the model's own one-by-one answers, one of them
spoiled, so exact match is known before lmms-eval runs. The class's request handling (stop
strings, refusals) is driven directly with lmms-eval's Instance objects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinylmm.api import build, load
from tinylmm.data.templates import IMAGE_TOKEN
from tinylmm.errors import ConfigError, DataError
from tinylmm.models.generation import generate_batch

from conftest import TINY

# lmms_eval/utils.py calls warnings.filterwarnings("ignore") when imported: kept inside this
# block, so the rest of the suite (collected in the same process) still sees its warnings.
with warnings.catch_warnings():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'tinylmm[lmms-eval]')")
    from lmms_eval.api.instance import Instance
    from loguru import logger  # lmms-eval's logger

    from tinylmm.api.lmms_eval_model import TinyLMMChat

QUESTIONS = ["What is in the picture?", "What colour is it?", "Is there a circle?", "Describe the image.", "Say hi."]
MAX_NEW_TOKENS = 4
UNTIL = "\n\n"
TASK_YAML = """\
task: tinylmm_local_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  until: ["{until}"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""
TASK_UTILS = """\
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")] if doc["image"] else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random checkpoint, 5 documents (4 with an image, 1 text-only) and what the
    checkpoint answers to each one by one."""
    root = tmp_path_factory.mktemp("lmmseval")
    model, processor = build("toy", [o for o in TINY if o.startswith("model.")])
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: freshly initialised, it repeats one token whatever the prompt
        for w in model.parameters():
            if w.dim() > 1:
                w.normal_(0, 0.2)
    ckpt = root / "run" / "final"
    model.save(ckpt, processor)
    model, processor = load(ckpt)
    docs = []
    for i, question in enumerate(QUESTIONS):
        image = None
        if i < 4:
            image = root / f"img{i}.png"
            Image.new("RGB", (32, 32), ((60 * i) % 256, (90 * i + 40) % 256, 200 - 40 * i)).save(image)
        docs.append({"id": i, "image": str(image) if image else "", "question": question})
    for doc in docs:
        pictures = [Image.open(doc["image"]).convert("RGB")] if doc["image"] else []
        text = f"{IMAGE_TOKEN}\n{doc['question']}" if pictures else doc["question"]
        [answer] = generate_batch(model, processor, [[("human", text)]], [pictures], max_new_tokens=MAX_NEW_TOKENS)
        doc["expected"] = answer.split(UNTIL, 1)[0]
    return ckpt, docs


def _lmms_eval(ckpt, root: Path, docs, *extra):
    """`lmms-eval --model tinylmm` on the local task over `docs`; its results and samples."""
    task = root / "task"
    task.mkdir()
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    until = UNTIL.encode("unicode_escape").decode()  # the YAML gets "\n\n", two newlines in double quotes
    (task / "tinylmm_local_vqa.yaml").write_text(
        TASK_YAML.format(docs=root / "docs.jsonl", max_new_tokens=MAX_NEW_TOKENS, until=until)
    )
    (task / "utils.py").write_text(TASK_UTILS)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(root / "hf"),
        "HF_DATASETS_CACHE": str(root / "hf" / "datasets"),
        "OMP_NUM_THREADS": "1",
    }
    script = Path(sys.executable).with_name("lmms-eval")  # the console script pip installed beside python
    assert script.is_file(), f"no {script}: reinstall lmms-eval"
    cmd = [str(script), "--model", "tinylmm", "--model_args", f"pretrained={ckpt},device=cpu"]
    cmd += ["--tasks", "tinylmm_local_vqa", "--include_path", str(task), "--output_path", str(root / "out")]
    cmd += ["--log_samples", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    # lmms-eval 0.7.3 exits 0 after an error during evaluation: its result files tell
    results = list((root / "out").rglob("*_results.json"))
    samples = list((root / "out").rglob("*_samples_tinylmm_local_vqa.jsonl"))
    assert proc.returncode == 0 and len(results) == len(samples) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    [results], [samples] = results, samples
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return json.loads(results.read_text()), {r["doc_id"]: r for r in rows}


def test_the_entry_point_registers_the_chat_model():
    from lmms_eval.models import get_model, get_model_manifest

    assert get_model("tinylmm") is TinyLMMChat, "reinstall tinylmm (pip install -e .) to register its entry point"
    assert get_model_manifest("tinylmm").chat_class_path == "tinylmm.api.lmms_eval_model.TinyLMMChat"


@pytest.mark.slow
def test_lmms_eval_cli_scores_a_local_task_to_the_predicted_exact_match(world, tmp_path):
    ckpt, docs = world
    assert len({d["expected"] for d in docs}) > 1  # answers that depend on the document: a mix-up would show
    targets = [dict(d, answer=d["expected"]) for d in docs]
    targets[2]["answer"] = "not what it says"  # one wrong: exact match 4/5
    results, samples = _lmms_eval(ckpt, tmp_path, targets, "--batch_size", "2")

    assert results["results"]["tinylmm_local_vqa"]["exact_match,none"] == pytest.approx(4 / 5)
    assert sorted(samples) == [0, 1, 2, 3, 4]
    # batches of 2, images and a text-only prompt mixed: the same answers as one by one
    assert [samples[i]["filtered_resps"] for i in range(5)] == [d["expected"] for d in docs]
    assert [samples[i].get("input_media") for i in range(5)] == [[d["image"]] for d in docs[:4]] + [None]
    assert [samples[i]["exact_match"] for i in range(5)] == [1.0, 1.0, 0.0, 1.0, 1.0]


# ---------------------------------------------------------------- the class, driven directly


@pytest.fixture(scope="module")
def chat(world):
    return TinyLMMChat(pretrained=str(world[0]), device="cpu")


def _requests(chat, messages, gen_kwargs):
    """Instances as lmms-eval's ConfigurableMessagesTask builds them, over documents in chat.task_dict."""
    chat.task_dict = {"t": {"test": [{"messages": m} for m in messages]}}
    return [
        Instance(
            request_type="generate_until",
            arguments=("ctx", lambda doc: doc["messages"], dict(gen_kwargs), i, "t", "test"),
            idx=0,
            metadata={"task": "t", "doc_id": i, "repeats": 1},
        )
        for i in range(len(messages))
    ]


def _user(text, image=None):
    content = [{"type": "image", "url": image}] if image is not None else []
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def test_generate_until_cuts_at_the_stop_strings_and_keeps_the_order(chat, world):
    _, docs = world
    image = Image.open(docs[0]["image"])
    messages = [_user(docs[0]["question"], image), _user(docs[4]["question"])]
    full = chat.generate_until(_requests(chat, messages, {"max_new_tokens": MAX_NEW_TOKENS, "until": []}))
    assert full == [docs[0]["expected"], docs[4]["expected"]]
    assert len(full[0]) >= 3
    stop = full[0][1:3]  # a piece inside the first answer: the answer ends before it
    warnings = []
    sink = logger.add(warnings.append, level="WARNING", format="{message}")
    try:
        kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "until": [stop], "image_aspect_ratio": "pad"}
        cut = chat.generate_until(_requests(chat, messages, kwargs))
    finally:
        logger.remove(sink)
    assert [w.strip() for w in warnings] == ["tinylmm: generation kwargs not used: image_aspect_ratio"]
    assert cut[0] == full[0].split(stop, 1)[0] and len(cut[0]) < len(full[0])
    assert cut[1] == full[1].split(stop, 1)[0]


@pytest.mark.parametrize(
    "gen_kwargs, options",
    [
        ({"temperature": 0.8, "top_p": 0.9}, {"do_sample": True, "temperature": 0.8, "top_p": 0.9}),
        ({"do_sample": True}, {"do_sample": True, "temperature": 1.0, "top_p": 1.0}),
        ({"temperature": 0, "num_beams": 2}, {"num_beams": 2}),
    ],
)
def test_sampling_and_beam_kwargs_reach_generate(chat, world, gen_kwargs, options):
    _, docs = world
    image = Image.open(docs[3]["image"]).convert("RGB")
    requests = _requests(chat, [_user(docs[3]["question"], image)], {"max_new_tokens": MAX_NEW_TOKENS, **gen_kwargs})
    torch.manual_seed(7)
    [answer] = chat.generate_until(requests)
    torch.manual_seed(7)
    [direct] = generate_batch(
        chat.model,
        chat.processor,
        [[("human", f"{IMAGE_TOKEN}\n{docs[3]['question']}")]],
        [[image]],
        max_new_tokens=MAX_NEW_TOKENS,
        **options,
    )
    assert answer == direct
    if "num_beams" in options:  # on this document beam search finds another answer than greedy
        assert answer != docs[3]["expected"]
    if options.get("do_sample"):  # sampled: another seed, another answer
        seeds = set()
        for seed in range(4):
            torch.manual_seed(seed)
            seeds.add(chat.generate_until(requests)[0])
        assert len(seeds) > 1


def test_requests_the_model_cannot_take_name_the_task_and_document(chat, world):
    image = world[1][0]["image"]
    system = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] + _user("Hi", image)
    with pytest.raises(DataError, match="task t, test document 0: a system message"):
        chat.generate_until(_requests(chat, [system], {}))
    video = [{"role": "user", "content": [{"type": "video", "url": "clip.mp4"}, {"type": "text", "text": "Hi"}]}]
    with pytest.raises(DataError, match="task t, test document 0: a video part"):
        chat.generate_until(_requests(chat, [video], {}))
    with pytest.raises(DataError, match="neither a PIL image nor an image file: 'nowhere.png'"):
        chat.generate_until(_requests(chat, [_user("Hi", "nowhere.png")], {}))
    with pytest.raises(NotImplementedError, match="generate_until tasks only; t asks for loglikelihood"):
        chat.loglikelihood(_requests(chat, [_user("Hi")], {}))
    with pytest.raises(NotImplementedError, match="t asks for generate_until_multi_round"):
        chat.generate_until_multi_round(_requests(chat, [_user("Hi")], {}))


def test_model_args_are_checked(world, monkeypatch):
    ckpt = str(world[0])
    with pytest.raises(ConfigError, match="needs --model_args pretrained="):
        TinyLMMChat()
    with pytest.raises(ConfigError, match="unknown model_args temprature"):
        TinyLMMChat(pretrained=ckpt, temprature=0)
    with pytest.raises(ConfigError, match="--batch_size auto is not supported"):
        TinyLMMChat(pretrained=ckpt, batch_size="auto")
    with pytest.raises(ConfigError, match="--batch_size auto is not supported"):
        TinyLMMChat(pretrained=ckpt, max_batch_size=16)
    with pytest.raises(ConfigError, match="--batch_size must be at least 1, not 0"):
        TinyLMMChat(pretrained=ckpt, batch_size="0")
    with pytest.raises(ConfigError, match="dtype 'fp8' is not one of float32, bfloat16, float16"):
        TinyLMMChat(pretrained=ckpt, dtype="fp8")
    with monkeypatch.context() as m:
        m.setenv("WORLD_SIZE", "2")
        with pytest.raises(ConfigError, match="runs in one process"):
            TinyLMMChat(pretrained=ckpt)
    half = TinyLMMChat(pretrained=ckpt, dtype="bfloat16", device="cpu", batch_size="3")
    assert half.batch_size == 3 and next(half.model.llm.parameters()).dtype == torch.bfloat16
