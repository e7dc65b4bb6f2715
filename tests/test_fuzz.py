"""Fuzzed inputs (hypothesis): `key=value` overrides, recipe and zoo YAML files and LLaVA JSON
data, malformed ones included. Whatever the input, the result is never a traceback: the
operation succeeds, or raises one of the errors a user can fix (tinylmm.cli.errors.USER_ERRORS,
one red line and exit 2 at the CLI) whose message names the key, file or sample at fault; a
malformed sample is skipped and reported with its id.

Nothing here builds a model: configs go through `tinylmm.config.resolve` (layers, schema,
registries, trainability rules), data through `LlavaDataset` with the toy tokenizer.
Deterministic (derandomize, no example database), so CI sees the same cases every run; the
cases run and the bad inputs among them are counted and printed at the end of the module.
"""

from __future__ import annotations

import io
import json
import string
import sys
from collections import Counter

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer

from tinylmm.catalog import zoo
from tinylmm.catalog.recipes import load_recipe
from tinylmm.cli.errors import USER_ERRORS
from tinylmm.config import resolve, to_dict
from tinylmm.data.llava import DataError, LlavaDataset
from tinylmm.data.processor import ImageProcessor, Processor
from tinylmm.resources import resource

from tiny_tokenizers import family_tokenizer


def fuzz_settings(n: int):
    return settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# test -> Counter(cases, rejected (a named error), accepted, skipped samples)
COUNTS: dict[str, Counter] = {}


def count(test: str, outcome: str, n: int = 1) -> None:
    COUNTS.setdefault(test, Counter())[outcome] += n


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not COUNTS:
        return
    with capture.global_and_fixture_disabled():
        write_counts(reporter)


def write_counts(reporter):
    total = sum(c["cases"] for c in COUNTS.values())
    rejected = sum(c["rejected"] for c in COUNTS.values())
    reporter.write_line("")
    for test, c in COUNTS.items():
        extra = f", {c['skipped']} samples skipped by id" if c["skipped"] else ""
        reporter.write_line(
            f"fuzz {test}: {c['cases']} cases, {c['rejected']} rejected with a named error, "
            f"{c['accepted']} accepted{extra}"
        )
    reporter.write_line(f"fuzz: {total} cases in all, {rejected} bad inputs rejected with a named error")


def outcome(test: str, call, *names):
    """Run `call()`: a result, or a user error whose message names one of `names` (the key,
    file or sample at fault). Anything else propagates: hypothesis reports it as a failure."""
    count(test, "cases")
    try:
        result = call()
    except USER_ERRORS as e:
        count(test, "rejected")
        message = str(e)
        assert message.strip(), f"{type(e).__name__} without a message"
        if names:
            assert any(str(n) in message for n in names), f"'{message}' names none of {names}"
        return e
    count(test, "accepted")
    return result


# --------------------------------------------------------------------------- values


MODE_WORDS = [
    "frozen",
    "full",
    "lora",
    "qlora",
    "partial:2",
    "partial:-1",
    "partial:50%",
    "partial:",
    "fulll",
    "partial:x",
    "partial:1e400%",
    "partial:nan%",
    "cosine",
    "linera",
    "nf4",
    "bf16",
    "shapes",
    "caption",
    "mlp2x_gelu",
    "llama",
    "phi",
    "auto",
    "open_clip:ViT-B-16",
    "builtin:toy",
    "null",
]
YAML_NOISE = "{}[]:,&*!|>'\"%@`#-?=. \t\n\\"

junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(MODE_WORDS),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def flow(value) -> str:
    """A value as the CLI's YAML (`{a: 1}`, `[x, y]`, `1.0e-05`)."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    return text[:-3].strip() if text.endswith("...") else text


yaml_value_text = st.one_of(
    junk.map(flow),
    st.text(alphabet=YAML_NOISE + string.ascii_letters + string.digits, max_size=16),  # YAML garbage
    st.text(max_size=8),  # any unicode
    st.sampled_from(
        [
            "&a [*a]",
            "&a {x: *a}",
            "!!python/object:os.system x",
            "{",
            "[1, 2",
            "'",
            "a: b: c",
            "\x00",
            "1e-4",
            "1.0e+400",
            "-.inf",
            ".nan",
            "0x1F",
            "1_000",
            "~",
            "yes",
            "on",
        ]
    ),
)


# --------------------------------------------------------------------------- overrides


def leaf_keys(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict) and v and k not in ("config", "data"):
            yield from leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


TOY_SHARE = to_dict(resolve("toy", "share")[0])
KEYS = sorted(set(leaf_keys(TOY_SHARE)) | {"stages.finetune.data.json", "stages.share.data.shapes", "preset", "recipe"})


@st.composite
def misspelt(draw, keys=KEYS):
    """A known key with one segment edited: a letter dropped, doubled, swapped or replaced."""
    parts = draw(st.sampled_from(keys)).split(".")
    i = draw(st.integers(0, len(parts) - 1))
    word = parts[i]
    j = draw(st.integers(0, max(len(word) - 1, 0)))
    edit = draw(st.sampled_from(["drop", "double", "swap", "replace"]))
    if edit == "drop":
        word = word[:j] + word[j + 1 :]
    elif edit == "double":
        word = word[: j + 1] + word[j:]
    elif edit == "swap" and len(word) > 1:
        j = min(j, len(word) - 2)
        word = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    else:
        word = word[:j] + draw(st.sampled_from("aeiouxz_")) + word[j + 1 :]
    parts[i] = word
    return ".".join(parts)


override_key = st.one_of(
    st.sampled_from(KEYS),
    misspelt(),
    st.sampled_from(KEYS).map(lambda k: k + ".deeper"),  # a path into a value
    st.builds(lambda s, k: f"stages.{s}.{k}", st.text(min_size=1, max_size=8), st.sampled_from(["lr", "tune.llm"])),
    st.sampled_from(["", ".", "stages..lr", "stages.finetune.", ".model", "model.vision.config.x", "ümlaut.ß"]),
    st.text(max_size=12),
)

bad_override = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", override_key, yaml_value_text),
    st.text(max_size=16).filter(lambda t: "=" not in t),  # `=` missing
)


def value_at(key: str):
    node = TOY_SHARE
    for part in key.split("."):
        node = node[part]
    return node


def like(value):
    """Values of the same type as `value`, mostly in range: well-formed overrides."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.sampled_from([value, value * 2, max(value // 2, 1), 1])
    if isinstance(value, float):
        return st.sampled_from([value, value / 2]) | st.floats(1e-6, 0.5)
    return st.just(value)


TYPED_KEYS = [k for k in KEYS if k.split(".")[0] not in ("preset", "recipe") and "data" not in k.split(".")]
good_override = st.sampled_from(TYPED_KEYS).flatmap(lambda k: like(value_at(k)).map(lambda v: f"{k}={flow(v)}"))
override_lists = st.one_of(
    st.lists(good_override, min_size=1, max_size=3),
    st.builds(
        lambda good, bad, i: good[:i] + [bad] + good[i:],
        st.lists(good_override, max_size=2),
        bad_override,
        st.integers(0, 2),
    ),
    st.lists(bad_override, min_size=1, max_size=3),
)


@fuzz_settings(400)
@given(overrides=override_lists, tune=st.sampled_from([None, "full", "lora", "qlora", "qlor"]))
@example(overrides=["stages.finetune.lr={a: 1}"], tune=None)  # was a TypeError: a mapping merged into a float
@example(overrides=["stages.finetune.tune.llm=partial:"], tune=None)  # YAML reads `partial:` as {partial: null}
@example(overrides=["stages.finetune.micro_batch_size=0"], tune=None)  # was a ZeroDivisionError
@example(overrides=["lora=5"], tune="lora")  # the tune switch read lora.lr from an int: AttributeError
@example(overrides=["lora.lr=abc"], tune="lora")  # float('abc'): ValueError
@example(overrides=["stages.finetune=5"], tune="lora")
@example(overrides=["stages=5"], tune="qlora")
@example(overrides=["stages.finetune.lr=&a [*a]"], tune=None)  # a self-referencing alias: RecursionError
@example(overrides=["stages.finetune.lr=1" + "0" * 400], tune=None)  # float(int) overflow
@example(overrides=["stages..lr=1"], tune=None)
def test_overrides_resolve_or_name_the_key(overrides, tune):
    first = overrides[0].split("=", 1)[0].strip().split(".")[0] or overrides[0]
    names = [first, "override", "--tune"] if len(overrides) == 1 else []  # which one is at fault: any
    outcome("overrides", lambda: resolve("toy", "share", overrides, tune=tune), *names)


def test_override_regressions_are_named_errors():
    """The cases the fuzzing found, with the message each gives now."""
    cases = {
        "stages.finetune.lr={a: 1}": "stages.finetune.lr: expected float",
        "stages.finetune.tune.llm=partial:": "stages.finetune.tune.llm: expected str",
        "stages.finetune.micro_batch_size=0": "stages.finetune.micro_batch_size=0 must be >= 1",
        "stages.finetune.batch_size=-8": "stages.finetune.batch_size=-8 must be >= 1",
        "stages.finetune.epochs=.nan": "epochs and max_len must be positive",
        "stages.finetune.lr=.inf": "stages.finetune.lr=inf must be positive and finite",
        "stages.finetune.max_grad_norm=0": "stages.finetune.max_grad_norm=0.0 must be positive",
        "stages.finetune.tune.llm=partial:1e400%": "needs a layer index",
        "stages.finetune.lr=&a [*a]": "refers to its own anchor",
        "stages.finetune.lr=1" + "0" * 400: "too large for a number",
        "stages..lr=1": "has an empty part",
        "shapes.n_eval=-1": "shapes.n_eval=-1 must be >= 0",
        "eval.batch_size=0": "eval.batch_size=0 must be >= 1",
    }
    for text, message in cases.items():
        with pytest.raises(USER_ERRORS, match=message.replace(".", r"\.").replace("(", r"\(")):
            resolve("toy", "share", [text])
    for text in ("lora=5", "lora.lr=abc", "stages.finetune=5", "stages=5"):
        with pytest.raises(USER_ERRORS, match=text.split("=")[0].split(".")[0]):
            resolve("toy", "share", [text], tune="lora")


# --------------------------------------------------------------------------- YAML documents


def paths_of(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths_of(v, prefix + (i,))


@st.composite
def mutated(draw, base):
    """`base` (a valid document) with a few edits: a value replaced by junk or a mode word, a
    key removed, misspelt or added, a mapping swapped for another type."""
    import copy

    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(0, 4))):
        paths = list(paths_of(doc))
        path = draw(st.sampled_from(paths))
        if not path:
            if draw(st.booleans()):
                doc = draw(junk)  # a wrong top-level type
            continue
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        key = path[-1]
        op = draw(st.sampled_from(["junk", "word", "delete", "misspell", "add"]))
        if op == "junk":
            parent[key] = draw(junk)
        elif op == "word":
            parent[key] = draw(st.sampled_from(MODE_WORDS))
        elif op == "delete":
            del parent[key]
        elif op == "misspell" and isinstance(key, str):
            parent[draw(misspelt(keys=[key]))] = parent.pop(key)
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(junk)
    return doc


def dump(doc) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


@st.composite
def yaml_file(draw, base):
    """The bytes of a YAML file: a mutated document, perhaps cut short or with a character
    inserted; YAML garbage; or bytes that are not UTF-8."""
    kind = draw(st.sampled_from(["doc", "doc", "doc", "cut", "insert", "noise", "bytes"]))
    if kind == "noise":
        return draw(st.text(alphabet=YAML_NOISE + "ab1\u00e9\u2603", max_size=40)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    text = dump(draw(mutated(base)))
    if kind == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif kind == "insert":
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.sampled_from(list(YAML_NOISE))) + text[i:]
    return text.encode()


SHARE = yaml.safe_load(resource("recipes/share.yaml").read_text())


@fuzz_settings(150)
@given(content=yaml_file(SHARE))
@example(content=b"stages: &a {x: *a}\n")  # a stage inside itself
@example(content=b"stages: {share: [\n")  # malformed YAML: was a raw yaml.ScannerError
@example(content=b"\xff\xfe\x00stages")  # not UTF-8: was a UnicodeDecodeError
@example(content=b"stages:\n  1: {data: {shapes: caption}}\n  '1': {}\n")  # two stages named 1
def test_recipe_files_resolve_or_name_the_file(tmp_path_factory, content):
    path = tmp_path_factory.getbasetemp() / "fuzz_recipe.yaml"
    path.write_bytes(content)
    # reading it: a problem names the file; resolving it: the key (stages.<name>.lr ...)
    if not isinstance(outcome("recipes", lambda: load_recipe(str(path)), path.name), Exception):
        outcome("recipes resolved", lambda: resolve("toy", str(path), []), "stages", "lora", "recipe")


TOY_ENTRY = yaml.safe_load(resource("model_zoo.yaml").read_text())["toy"]
ZOO_BASE = {"fuzz-preset": {k: v for k, v in TOY_ENTRY.items()}}


@fuzz_settings(150)
@given(content=yaml_file(ZOO_BASE))
@example(content=b"p: {model: {llm: {}}, stage_defaults: 5}\n")  # was an AttributeError ('int'.items)
@example(content=b"p: {model: {llm: {}}, run: [1]}\n")  # was a TypeError (dict([1]))
@example(content=b"p: {model: {llm: {}}, description: [1]}\n")
@example(content=b"p: &a {model: *a}\n")
@example(content=b"- a\n- b\n")
def test_zoo_files_register_or_name_the_file(tmp_path_factory, content):
    path = tmp_path_factory.getbasetemp() / "fuzz_zoo.yaml"
    path.write_bytes(content)

    try:
        names = outcome("zoo", lambda: zoo.register(path), path.name)
        for name in [] if isinstance(names, Exception) else names:
            outcome("zoo presets resolved", lambda: resolve(name, "share", []), "model", "stages", "recipe")  # noqa: B023
    finally:
        zoo.unregister(path)


# --------------------------------------------------------------------------- LLaVA JSON


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    Image.new("RGB", (12, 6), (0, 255, 0)).save(d / "a.png")
    (d / "garbage.png").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, "PNG")
    (d / "cut.png").write_bytes(buf.getvalue()[:60])  # a PNG cut short
    return d


@pytest.fixture(scope="module")
def proc():
    tok = AutoTokenizer.from_pretrained(str(family_tokenizer("toy")))
    return Processor(tok, ImageProcessor(size=8, image_mean=[0.5] * 3, image_std=[0.5] * 3), "llama", 3)


IMAGES = ["a.png", "garbage.png", "cut.png", "missing.png", "", "/nonexistent/x.png", "sub/../a.png"]
roles = st.one_of(st.sampled_from(["human", "gpt", "user", "assistant", "system", "Human", ""]), junk)
texts = st.one_of(
    st.builds(
        lambda a, b: a + b, st.sampled_from(["", "<image>\n", "<image><image>", "x <image> y"]), st.text(max_size=20)
    ),
    st.sampled_from(["red", "What colour?", " ", "\ud800", "<image>"]),
    junk,
)
turn = st.one_of(
    st.fixed_dictionaries({"from": roles, "value": texts}),
    st.fixed_dictionaries({}, optional={"from": roles, "value": texts, "extra": junk}),
    junk,
)
conversation = st.one_of(
    st.lists(st.tuples(texts, texts), min_size=1, max_size=3).map(
        lambda pairs: [t for q, a in pairs for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    ),
    st.lists(turn, max_size=4),
    junk,
)
good_sample = st.builds(
    lambda sid, image, q, a: {
        "id": sid,
        **({"image": "a.png"} if image else {}),
        "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + q}, {"from": "gpt", "value": a}],
    },
    st.text(string.ascii_letters, min_size=1, max_size=4),
    st.booleans(),
    st.sampled_from(["What colour?", "Describe the image.", "Where is the red circle?"]),
    st.sampled_from(["red", "A red circle at the top left.", "yes"]),
)
sample = st.one_of(
    st.fixed_dictionaries(
        {"conversations": conversation},
        optional={
            "id": st.one_of(st.text(max_size=6), st.integers(), junk),
            "image": st.one_of(st.sampled_from(IMAGES), st.lists(st.sampled_from(IMAGES), max_size=2), junk),
        },
    ),
    junk,
)


def data_file(samples) -> st.SearchStrategy:
    as_json = samples.map(lambda s: json.dumps(s).encode())
    return st.one_of(
        as_json,
        as_json,
        as_json,
        st.one_of(junk, st.dictionaries(st.text(max_size=4), sample, max_size=2)).map(
            lambda d: json.dumps(d).encode()
        ),  # not a list
        st.binary(max_size=30),  # not JSON, or not UTF-8
        st.builds(lambda s, i: json.dumps(s).encode()[:i], samples, st.integers(0, 200)),  # cut short
    )


def sample_ids(raw) -> set[str]:
    """Every id a skip may name: a sample's own `id`, or its position."""
    return {str(s["id"]) for s in raw if isinstance(s, dict) and "id" in s} | {f"#{i}" for i in range(len(raw))}


mostly_good = st.integers(0, 2).flatmap(lambda i: sample if i == 0 else good_sample)


@fuzz_settings(200)
@given(
    content=data_file(st.lists(mostly_good, min_size=1, max_size=5) | st.just([])),
    max_len=st.sampled_from([8, 96, 256, 256]),
    template=st.sampled_from(["llama", "pretrain"]),
)
@example(
    content=b'[{"id": "r", "conversations": [{"from": ["human"], "value": "x"}]}]', max_len=64, template="llama"
)  # an unhashable role: was a TypeError
@example(content=b'[{"id": "i", "image": 5, "conversations": []}]', max_len=64, template="llama")  # list(5)
@example(
    content=b'[{"id": "u", "conversations": [{"from": "human", "value": "\\ud800"}, {"from": "gpt", "value": "x"}]}]',
    max_len=64,
    template="llama",
)  # a lone surrogate
@example(content=b"\xff\xfe[", max_len=64, template="llama")  # not UTF-8: was a UnicodeDecodeError
@example(content=b"[" * 100_000, max_len=64, template="llama")  # deeper than json's recursion
@example(
    content=b'[{"id": "g", "image": "garbage.png", "conversations": [{"from": "human", "value": "<image>\\nq"},'
    b' {"from": "gpt", "value": "red"}]}]',
    max_len=64,
    template="llama",
)
def test_llava_files_load_or_name_the_file_and_skips_name_the_sample(proc, data_dir, content, max_len, template):
    path = data_dir / "fuzz.json"
    path.write_bytes(content)
    tpl = proc.get_template(template)
    ds = outcome("llava", lambda: LlavaDataset(path, data_dir, proc, tpl, max_len), path.name)
    if isinstance(ds, Exception):
        assert isinstance(ds, DataError), f"a dataset file's problem is a DataError, not {type(ds).__name__}"
        return
    raw = json.loads(content)
    assert len(ds) + len(ds.report.skipped) == ds.report.total == len(raw)
    ids = sample_ids(raw)
    for sid, reason in ds.report.skipped:
        assert sid in ids and reason.split(":")[0], (sid, reason)
    count("llava", "skipped", len(ds.report.skipped))
    for i in range(len(ds)):  # images are read here: an undecodable one names its sample
        sid = ds.sample_id(i)
        try:
            ds[i]
        except DataError as e:
            assert f"sample '{sid}'" in str(e)


def test_file_regressions_are_named_errors_or_skips(proc, data_dir, tmp_path):
    """The file cases the fuzzing found, with what each gives now."""
    recipe = tmp_path / "r.yaml"
    for text, message in (
        (b"stages: {share: [\n", "r.yaml: not valid YAML"),
        (b"\xff\xfestages", "r.yaml: not UTF-8 text"),
        (b"stages: &a {x: *a}\n", "r.yaml: a YAML alias refers to its own anchor"),
        (b"stages:\n  1: {}\n  '1': {}\n", "r.yaml: two stages have the same name"),
    ):
        recipe.write_bytes(text)
        with pytest.raises(USER_ERRORS, match=message):
            load_recipe(str(recipe))
    recipe.write_text("stages:\n  1: {data: {shapes: caption}}\n")  # a stage named 1 is addressed as "1"
    cfg, _ = resolve("toy", str(recipe), ["stages.1.lr=1e-3"])
    assert cfg.stages["1"].lr == 1e-3
    zoo_file = tmp_path / "z.yaml"
    for text, message in (
        ("p: {model: {llm: {}}, stage_defaults: 5}", "z.yaml:p.stage_defaults: expected a mapping, got 5"),
        ("p: {model: {llm: {}}, run: [1]}", r"z.yaml:p.run: expected a mapping, got \[1\]"),
        ("p: {model: {llm: {}}, description: [1]}", "z.yaml:p.description: expected text"),
    ):
        zoo_file.write_text(text)
        with pytest.raises(USER_ERRORS, match=message):
            zoo.register(zoo_file)
    answer = [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"}]
    samples = [
        {"id": "ok", "conversations": answer},
        {"id": "role", "conversations": [{"from": ["human"], "value": "x"}, *answer[1:]]},
        {"id": "img", "image": 5, "conversations": answer},
        {"id": "sur", "conversations": [{"from": "human", "value": "\ud800"}, *answer[1:]]},
        {"id": ["not", "an", "id"], "conversations": []},
    ]
    path = data_dir / "regressions.json"
    path.write_text(json.dumps(samples))
    ds = LlavaDataset(path, data_dir, proc, proc.template, 256)
    assert [ds.sample_id(i) for i in range(len(ds))] == ["ok"]
    reasons = dict(ds.report.skipped)
    assert reasons["role"].startswith("bad conversation: turn 0")
    assert reasons["img"].startswith("bad image")
    assert reasons["sur"] == "bad conversation: turn 0: 'value' is not valid Unicode text"
    assert reasons["#4"].startswith("bad conversation")  # an id that is no name: the sample's position
    for content, message in ((b"\xff\xfe[", "is not valid JSON"), (b"[]", "holds no samples"), (b"[" * 100_000, "")):
        path.write_bytes(content)
        with pytest.raises(DataError, match=f"regressions.json.*{message}"):
            LlavaDataset(path, data_dir, proc, proc.template, 256)


# --------------------------------------------------------------------------- the CLI


def run_tinylmm(monkeypatch, capsys, *argv):
    from tinylmm.cli.app import app
    from tinylmm.cli.errors import run_cli

    monkeypatch.setattr(sys, "argv", ["tinylmm", *argv])
    code = run_cli(app)
    err = capsys.readouterr().err
    return code, err


def test_cli_bad_inputs_exit_2_with_one_named_line(monkeypatch, capsys, tmp_path):
    (tmp_path / "recipe.yaml").write_text("stages: {share: [\n")
    (tmp_path / "zoo.yaml").write_text("p: {model: {llm: {}}, stage_defaults: 5}\n")
    (tmp_path / "cyclic.yaml").write_text("stages: &a {x: *a}\n")
    cases = [
        (["train", "stages.finetune.lr={a: 1}"], "stages.finetune.lr"),
        (["train", "stages.finetune.micro_batch_size=0"], "micro_batch_size"),
        (["train", "--tune", "lora", "lora=5"], "lora"),
        (["train", "stages..lr=1"], "stages..lr"),
        (["train", "--recipe", str(tmp_path / "recipe.yaml")], "recipe.yaml"),
        (["train", "--recipe", str(tmp_path / "cyclic.yaml")], "cyclic.yaml"),
        (["train", "--zoo", str(tmp_path / "zoo.yaml")], "zoo.yaml"),
        (["plan", "stages.finetune.tune.llm=partial:"], "stages.finetune.tune.llm"),
    ]
    for argv, name in cases:
        code, err = run_tinylmm(monkeypatch, capsys, *argv)
        count("cli", "cases")
        count("cli", "rejected")
        assert code == 2, (argv, err)
        assert "Traceback" not in err and err.startswith("error:") and err.count("error:") == 1, (argv, err)
        assert name in err.replace("\n", ""), (argv, err)  # rich wraps long lines
    zoo.unregister()


def test_unknown_options_are_usage_errors_not_tracebacks(monkeypatch, capsys):
    """click's usage errors, wherever typer keeps click (typer >= 0.29 vendors its own copy,
    whose exceptions are not click's): the usage message and exit 2, never a traceback."""
    for argv, option in [
        (["train", "--bogus"], "--bogus"),
        (["eval", "runs/x/final", "-o", "y"], "-o"),  # the model-first form of `eval`
        (["eval", "run", "runs/x/final", "--bogus"], "--bogus"),
    ]:
        code, err = run_tinylmm(monkeypatch, capsys, *argv)
        assert code == 2, (argv, err)
        assert "Traceback" not in err and f"No such option: {option}" in err, (argv, err)


def test_fuzzing_ran_bad_inputs(request):
    """Each fuzzer tried inputs that were refused and inputs that were accepted: the
    strategies reach both sides (run with the tests above; alone it has nothing to check)."""
    fuzzers = ["overrides", "recipes", "zoo", "llava"]
    ran = [f for f in fuzzers if COUNTS.get(f)]
    if not ran:
        pytest.skip("run with the fuzz tests above: it checks what they tried")
    for f in ran:
        c = COUNTS[f]
        assert c["rejected"] > 0 and c["accepted"] > 0, (f, dict(c))
    if "llava" in ran:
        assert COUNTS["llava"]["skipped"] > 0
