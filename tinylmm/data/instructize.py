"""Instructization: datasets that are not conversations (VQA, multiple-choice VQA, captions,
referring expressions) turned into LLaVA conversations, with Honeybee's template options.

Honeybee (Cha et al., CVPR 2024, "Honeybee: Locality-enhanced Projector for Multimodal LLM",
Sec. 4 and kakaobrain/honeybee `pipeline/data_utils`) instructizes each dataset with
(instruction, input, target) patterns filled from a record's fields. The rules followed here:

- **Templates** are `input`/`target` patterns with `{field}` placeholders (a YAML file per task,
  tinylmm/assets/instruct/<task>.yaml, that users copy and edit). A record's image opens the
  first human turn as `<image>\\n`, as LLaVA's data has it.
- **Granularity.** Coarse-grained: one template set per task (Honeybee's `pattern_map` sends
  vqa, vgqa, ocrvqa and okvqa to one `vqa` set). Fine-grained: one set per dataset (the
  file's `datasets.<name>` entry), chosen with `dataset`.
- **Diversity.** `single`: the set's first template. `multiple`: one template drawn per
  conversation, used for all its turns (Honeybee's `Templatizer.sample`: `random.choice`
  over the patterns, per sample).
- **Multi-turn merging.** An image's records become conversations of `turns` QA pairs
  (Honeybee's `nturn`, 10 for VQAv2 and GQA; 0 here: all of them), in file order.
- **De-duplication**, applied only when pairs are merged (as Honeybee's `finalize_data`):
  within one image, a pair whose normalised question (`dedup: question`; lower case, spaces
  collapsed, trailing ?.! dropped) or answer (`dedup: answer`, Honeybee's configs' key) was
  already seen is dropped; the first one is kept (Honeybee's offline mode).
- **Input inversion** (as in the FLAN collection, Longpre et al. 2023): a fraction `invert`
  of the conversations uses the task's `inverted` templates, which ask for the input from the
  target (the question from the answer; for boxes, Honeybee's grounded captioning).
- **Multiple-choice options** are lettered "A. ..." one per line, and the target is the letter
  (Honeybee's `optionize` upper/dot style; LLaVA-1.5's ScienceQA data). `shuffle_choices`
  shuffles them first, as Honeybee's fine-tuning config does (`option.shuffle: True`).
- **Boxes** are `[x1,y1,x2,y2]` normalised to 0-1 by the image size, three decimals
  (Honeybee's `preprocess_bbox`, bbox_coord_style 3); inputs in COCO's `xywh` pixels (default),
  `xyxy` pixels, or already normalised `xyxy_norm`.

Everything random (template, inversion, option order) comes from one generator seeded by
`seed`, drawn in file order, so a seed fixes the output.
"""

from __future__ import annotations

import csv
import json
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from PIL import Image

from tinylmm.data.templates.core import IMAGE_TOKEN
from tinylmm.errors import ConfigError, DataError, did_you_mean, unknown
from tinylmm.files import copy_new, write_file_atomically
from tinylmm.resources import asset

TASKS = ("vqa", "mcvqa", "caption", "rec")
# the record fields each task reads (canonical names; `fields` maps them to a file's own keys)
TASK_FIELDS = {
    "vqa": ("question", "answer"),
    "mcvqa": ("question", "choices", "answer"),
    "caption": ("caption",),
    "rec": ("phrase", "bbox"),
}
# what de-duplication compares, per task: the pair's input side and its target side
DEDUP_KEYS = {
    "vqa": {"question": "question", "answer": "answer"},
    "mcvqa": {"question": "question", "answer": "answer_text"},
    "caption": {"question": "caption", "answer": "caption"},
    "rec": {"question": "phrase", "answer": "bbox"},
}
# placeholders a template may use beyond the task's fields
DERIVED = {"mcvqa": ("options", "answer_text"), "rec": (), "vqa": (), "caption": ()}
BBOX_FORMATS = ("xywh", "xyxy", "xyxy_norm")


@dataclass(frozen=True)
class Template:
    input: str
    target: str


@dataclass(frozen=True)
class TemplateSet:
    """One task's templates, read from its YAML file."""

    task: str
    templates: tuple[Template, ...]
    inverted: tuple[Template, ...] = ()
    datasets: dict[str, TemplateSet] = field(default_factory=dict)
    source: str = ""

    def for_dataset(self, name: str | None, granularity: str) -> TemplateSet:
        if granularity == "coarse":
            return self
        if name is None:
            raise ConfigError(f"granularity 'fine' needs a dataset name; {self.source} has: {', '.join(self.datasets)}")
        if name not in self.datasets:
            raise unknown(f"dataset in {self.source} (fine-grained templates)", name, self.datasets)
        return self.datasets[name]


@dataclass(frozen=True)
class InstructOptions:
    """How to instructize one file (the stage option `data.instructize` and the CLI's flags)."""

    task: str
    templates: str | None = None  # a YAML file; None: the shipped one for the task
    granularity: str = "coarse"  # coarse: one set per task; fine: the dataset's own set
    dataset: str | None = None  # the fine-grained set's name (and the ids' prefix)
    diversity: str = "multiple"  # single: the first template; multiple: one drawn per conversation
    turns: int = 1  # QA pairs per conversation, merged per image; 0: all of an image's pairs
    dedup: str = "question"  # question | answer | none (applies when turns != 1)
    invert: float = 0.0  # fraction of conversations built from the inverted templates
    shuffle_choices: bool = False  # mcvqa: shuffle the options before lettering them
    bbox_format: str = "xywh"  # rec: the input boxes' format
    fields: dict[str, str] = field(default_factory=dict)  # canonical field -> the file's key
    image_field: str = "image"
    id_field: str = "id"
    seed: int = 0

    def __post_init__(self):
        checks = {
            "task": TASKS,
            "granularity": ("coarse", "fine"),
            "diversity": ("single", "multiple"),
            "dedup": ("question", "answer", "none"),
            "bbox_format": BBOX_FORMATS,
        }
        for name, allowed in checks.items():
            value = getattr(self, name)
            if value not in allowed:
                raise unknown(f"instructize {name}", value, allowed)
        if not isinstance(self.turns, int) or isinstance(self.turns, bool) or self.turns < 0:
            raise ConfigError(f"instructize turns must be a whole number >= 0 (0: all), got {self.turns!r}")
        if not isinstance(self.invert, (int, float)) or not 0 <= self.invert <= 1:
            raise ConfigError(f"instructize invert must be a fraction in [0, 1], got {self.invert!r}")
        for key in self.fields:
            if key not in TASK_FIELDS[self.task]:
                raise unknown(f"field of task '{self.task}'", key, TASK_FIELDS[self.task])

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> InstructOptions:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping of instructize options")
        names = {f.name for f in fields(cls)}
        for key in raw:
            if key not in names:
                raise ConfigError(f"unknown key '{key}' in {where}{did_you_mean(key, names)}")
        if "task" not in raw:
            raise ConfigError(f"{where} needs 'task' (one of {', '.join(TASKS)})")
        return cls(**raw)


@dataclass
class InstructReport:
    """What one instructization did, for the CLI and the run's log."""

    records: int = 0
    conversations: int = 0
    pairs: int = 0
    duplicates: list[str] = field(default_factory=list)  # ids of the pairs de-duplication dropped
    inverted: int = 0

    def summary(self) -> str:
        def n(count: int, word: str) -> str:
            return f"{count} {word}" + ("" if count == 1 else "s")

        return (
            f"{n(self.records, 'record')} -> {n(self.conversations, 'conversation')} of {n(self.pairs, 'QA pair')}"
            f" ({n(len(self.duplicates), 'duplicate pair')} dropped, {self.inverted} inverted)"
        )


def shipped() -> dict[str, Path]:
    """The shipped template files by the name `tinylmm ls instruct` and `tinylmm cp` use."""
    return {f"instruct-{task}": asset("instruct") / f"{task}.yaml" for task in TASKS}


def describe(path: Path) -> str:
    """A template file's first comment line."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def copy_templates(name: str, dest: str | Path) -> Path:
    """Copy the shipped template file `name` to `dest` (a file, or a directory to put it in);
    never overwrites."""
    table = shipped()
    if name not in table:
        raise unknown("instruction template file", name, table)
    return copy_new(table[name], dest)


def load_templates(task: str, path: str | Path | None = None) -> TemplateSet:
    """The task's template set: the file at `path`, else the shipped one."""
    if task not in TASKS:
        raise unknown("instructize task", task, TASKS)
    path = Path(path) if path is not None else asset("instruct") / f"{task}.yaml"
    if not path.is_file():
        raise DataError(f"template file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"template file '{path}' is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise DataError(f"template file '{path}' must hold a mapping with 'task' and 'templates'")
    if raw.get("task") != task:
        raise DataError(f"template file '{path}' is for task '{raw.get('task')}', not '{task}'")
    allowed = set(TASK_FIELDS[task]) | set(DERIVED[task])
    return _template_set(raw, task, allowed, f"'{path}'", top=True)


def _template_set(raw: dict, task: str, allowed: set[str], where: str, top: bool) -> TemplateSet:
    keys = {"task", "fields", "templates", "inverted", "datasets"} if top else {"templates", "inverted"}
    for key in raw:
        if key not in keys:
            raise DataError(f"unknown key '{key}' in template file {where}{did_you_mean(key, keys)}")

    def templates(name: str) -> tuple[Template, ...]:
        items = raw.get(name) or []
        if not isinstance(items, list):
            raise DataError(f"{where}: '{name}' must be a list of {{input, target}} templates")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or set(item) != {"input", "target"}:
                raise DataError(f"{where}: {name}[{i}] must have exactly 'input' and 'target'")
            for side in ("input", "target"):
                text = item[side]
                if not isinstance(text, str):
                    raise DataError(f"{where}: {name}[{i}].{side} must be text")
                for _, placeholder, _, _ in string.Formatter().parse(text):
                    if placeholder is not None and placeholder not in allowed:
                        raise DataError(
                            f"{where}: {name}[{i}].{side} uses '{{{placeholder}}}'"
                            f"{did_you_mean(placeholder, allowed)}; task '{task}' has: {', '.join(sorted(allowed))}"
                        )
            out.append(Template(item["input"], item["target"]))
        return tuple(out)

    main = templates("templates")
    if not main:
        raise DataError(f"{where}: 'templates' must list at least one template")
    datasets = {}
    if top:
        sets = raw.get("datasets") or {}
        if not isinstance(sets, dict):
            raise DataError(f"{where}: 'datasets' must map dataset names to template sets")
        for name, sub in sets.items():
            if not isinstance(sub, dict):
                raise DataError(f"{where}: datasets.{name} must be a mapping with 'templates'")
            datasets[str(name)] = _template_set(sub, task, allowed, f"{where} datasets.{name}", top=False)
    return TemplateSet(task, main, templates("inverted"), datasets, where)


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSON file (a list, or an object holding one list), JSON lines or CSV."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file '{path}' does not exist")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        return [dict(row) for row in csv.DictReader(text.splitlines())]
    if path.suffix.lower() == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {i}: not valid JSON: {e}") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"input file '{path}' is not valid JSON: {e}") from None
        lists = [v for v in raw.values() if isinstance(v, list)] if isinstance(raw, dict) else []
        if isinstance(raw, dict) and len(lists) == 1:
            raw = lists[0]  # {"data": [...]}, {"annotations": [...]}, ...
        if not isinstance(raw, list):
            raise DataError(f"input file '{path}' must hold a list of records (or an object with one list)")
        records = raw
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"input file '{path}': record {i} is not an object")
    return records


def normalise(text: str) -> str:
    """What de-duplication compares: lower case, spaces collapsed, trailing ?.! dropped."""
    return re.sub(r"\s+", " ", str(text).lower()).strip().rstrip("?.!").strip()


@dataclass
class _Pair:
    rid: str
    image: str | None
    values: dict[str, str]  # placeholders -> text


def instructize(
    records: Sequence[dict],
    options: InstructOptions,
    *,
    source: str = "input",
    image_sizes=None,
) -> tuple[list[dict], InstructReport]:
    """LLaVA conversations from `records`. `image_sizes(path) -> (width, height)` gives a rec
    record's image size when the record has no `width`/`height`."""
    tset = load_templates(options.task, options.templates).for_dataset(options.dataset, options.granularity)
    if options.invert > 0 and not tset.inverted:
        raise ConfigError(f"instructize invert {options.invert}: {tset.source} has no 'inverted' templates")
    rng = random.Random(options.seed)
    report = InstructReport(records=len(records))
    prefix = options.dataset or Path(source).stem
    problems: list[str] = []
    pairs = []
    for i, record in enumerate(records):
        rid = str(record.get(options.id_field, f"{prefix}-{i}"))
        try:
            pairs.append(_pair(record, rid, options, rng, image_sizes))
        except _RecordError as e:
            problems.append(f"record {rid}: {e}")
    if problems:
        more = f" ... ({len(problems) - 10} more)" if len(problems) > 10 else ""
        raise DataError(
            f"{source}: {len(problems)} record(s) cannot be instructized: " + "; ".join(problems[:10]) + more
        )

    groups: dict[object, list[_Pair]] = {}
    for n, pair in enumerate(pairs):  # an image's pairs together, in file order; text-only ones alone
        groups.setdefault(pair.image if pair.image is not None else ("text", n), []).append(pair)
    samples = []
    for group in groups.values():
        if options.turns != 1 and options.dedup != "none":
            group = _dedup(group, DEDUP_KEYS[options.task][options.dedup], report)
        step = options.turns or len(group)
        chunks = [group[k : k + step] for k in range(0, len(group), step)]
        for chunk in chunks:
            inverted = options.invert > 0 and rng.random() < options.invert
            pool = tset.inverted if inverted else tset.templates
            template = pool[0] if options.diversity == "single" else rng.choice(pool)
            report.inverted += inverted
            samples.append(_conversation(chunk, template))
            report.pairs += len(chunk)
    report.conversations = len(samples)
    return samples, report


class _RecordError(ValueError):
    pass


def _pair(record: dict, rid: str, options: InstructOptions, rng: random.Random, image_sizes) -> _Pair:
    def get(name: str):
        key = options.fields.get(name, name)
        value = record.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise _RecordError(f"no '{key}'" + (f" (the {name} field)" if key != name else ""))
        return value

    image = record.get(options.image_field)
    if image is not None and not (isinstance(image, str) and image):
        raise _RecordError(f"'{options.image_field}' must be an image path")
    values = {}
    task = options.task
    if task == "vqa":
        values = {"question": str(get("question")).strip(), "answer": str(get("answer")).strip()}
    elif task == "caption":
        values = {"caption": str(get("caption")).strip()}
    elif task == "mcvqa":
        choices = _choices(get("choices"))
        answer = _answer_index(get("answer"), choices)
        if options.shuffle_choices:
            order = list(range(len(choices)))
            rng.shuffle(order)
            answer = order.index(answer)
            choices = [choices[j] for j in order]
        letters = string.ascii_uppercase
        values = {
            "question": str(get("question")).strip(),
            "options": "\n".join(f"{letters[j]}. {c}" for j, c in enumerate(choices)),
            "answer": letters[answer],
            "answer_text": choices[answer],
            "choices": ", ".join(choices),
        }
    elif task == "rec":
        values = {"phrase": str(get("phrase")).strip(), "bbox": _bbox(record, get("bbox"), image, options, image_sizes)}
    return _Pair(rid, image, values)


def _choices(raw) -> list[str]:
    if isinstance(raw, str):  # CSV: a JSON list, or choices separated by "|"
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raw = raw.split("|")
    if not isinstance(raw, list) or len(raw) < 2 or len(raw) > 26:
        raise _RecordError(f"choices must be a list of 2 to 26 options, got {raw!r:.60}")
    return [str(c).strip() for c in raw]


def _answer_index(raw, choices: list[str]) -> int:
    """The answer as an index (0-based), one choice's text, or a letter."""
    text = str(raw).strip()
    if (isinstance(raw, int) and not isinstance(raw, bool)) or text.isdigit():  # 0-based, as ScienceQA's
        index = int(text)
    elif text in choices:  # before letters: a choice may itself be "a"
        index = choices.index(text)
    elif len(text) == 1 and text.upper() in string.ascii_uppercase:
        index = string.ascii_uppercase.index(text.upper())
    else:
        raise _RecordError(f"answer {text!r:.40} is neither an index, a letter nor one of the choices")
    if not 0 <= index < len(choices):
        raise _RecordError(f"answer {text!r} is out of range for {len(choices)} choices")
    return index


def _bbox(record: dict, raw, image, options: InstructOptions, image_sizes) -> str:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise _RecordError(f"bbox {raw!r:.40} is not a list of 4 numbers") from None
    if not (isinstance(raw, list) and len(raw) == 4 and all(isinstance(v, (int, float)) for v in raw)):
        raise _RecordError(f"bbox must be 4 numbers, got {raw!r:.60}")
    if options.bbox_format == "xyxy_norm":
        box = [float(v) for v in raw]
    else:
        width, height = record.get("width"), record.get("height")
        if width is None or height is None:
            if image is None or image_sizes is None:
                raise _RecordError("a pixel bbox needs the image size: 'width' and 'height', or the image folder")
            width, height = image_sizes(image)
        width, height = float(width), float(height)
        x1, y1, a, b = (float(v) for v in raw)
        x2, y2 = (x1 + a, y1 + b) if options.bbox_format == "xywh" else (a, b)
        box = [x1 / width, y1 / height, x2 / width, y2 / height]
    if not (0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1):
        raise _RecordError(f"bbox {raw} ({options.bbox_format}) is not inside the image")
    return "[" + ",".join(f"{v:.3f}" for v in box) + "]"


def _dedup(group: list[_Pair], key: str, report: InstructReport) -> list[_Pair]:
    seen, kept = set(), []
    for pair in group:
        value = normalise(pair.values[key])
        if value in seen:
            report.duplicates.append(pair.rid)
            continue
        seen.add(value)
        kept.append(pair)
    return kept


def _conversation(chunk: list[_Pair], template: Template) -> dict:
    """One conversation of `chunk`'s pairs, under the id of its first record."""
    turns = []
    for n, pair in enumerate(chunk):
        prompt = template.input.format(**pair.values)
        if n == 0 and pair.image is not None:
            prompt = f"{IMAGE_TOKEN}\n{prompt}"
        turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": template.target.format(**pair.values)}]
    sample = {"id": chunk[0].rid}
    if chunk[0].image is not None:
        sample["image"] = chunk[0].image
    sample["conversations"] = turns
    return sample


def instructize_file(src, out, options, *, images=None):
    """Instructize the records of `src` (JSON, JSON lines or CSV) into the LLaVA JSON `out`,
    written whole or not at all. `options`: an InstructOptions, or a dict of its fields.
    `images`: the image folder, for boxes given in pixels without the image's size.
    Returns (out, report)."""
    if isinstance(options, dict):
        options = InstructOptions(**options)

    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise DataError(f"--out '{out}' is the input file; write the conversations elsewhere")
    image_sizes = None
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise DataError(f"image folder '{folder}' does not exist")

        def image_sizes(rel: str) -> tuple[int, int]:
            path = folder / rel
            try:
                with Image.open(path) as im:
                    return im.size
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read the size of image '{path}': {e}") from None

    samples, report = instructize(read_records(src), options, source=str(src), image_sizes=image_sizes)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out, json.dumps(samples, indent=1, ensure_ascii=False) + "\n")  # an earlier `out` stays whole
    return out, report
