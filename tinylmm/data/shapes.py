"""`shapes`: a built-in synthetic dataset that a tiny LMM can learn on a CPU in minutes.

Each image holds 1-4 coloured shapes, each in its own cell of a 4x4 grid (one cell per
visual token of the toy's tower: 64 px images in 16 px patches). Objects (a colour
and a shape) have a fixed popularity and co-occur (a companion often shares a colour or a
shape). Captions and questions are generated from the same `Scene` that is rendered, so every
answer is true by construction: colour, shape, count, position on the grid, spatial relations
("left of", "above") and existence, whose absent objects are drawn with POPE's three negative
samplings (`tinylmm.data.pope`). Each question type has a fixed answer set (`CHOICES`), which
gives the eval split its chance level; the eval split also holds POPE's random, popular and
adversarial splits over images of their own. Pure Python + PIL, deterministic from a seed: every split draws
from its own `random.Random`, never the global RNG.

    paths = write_shapes_dataset("data/shapes", seed=0)   # LLaVA-format JSON + PNGs
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from tinylmm.data.pope import STRATEGIES, ObjectStats, pope_questions

FORMAT = "tinylmm-shapes"
FORMAT_VERSION = 3

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
GRID = 4
# row-major 4x4 grid; rows and columns counted from the top left, as one reads
CELLS = tuple(f"row {r}, column {c}" for r in range(1, GRID + 1) for c in range(1, GRID + 1))
MAX_SHAPES = 4
RELATIONS = ("left of", "right of", "above", "below")
QUESTION_TYPES = ("color", "shape", "count", "position", "relation", "exist")
CHOICES: dict[str, list[str]] = {
    "color": list(COLORS),
    "shape": list(SHAPES),
    "count": [str(n) for n in range(MAX_SHAPES + 1)],
    "position": list(CELLS),
    "relation": ["yes", "no"],
    "exist": ["yes", "no"],
}
CAPTION_PROMPTS = (
    "Describe the image.",
    "What is in the image?",
    "Describe the shapes in this picture.",
    "Give a short description of the image.",
)
POPE_TEMPLATE = "Is there {} in the image?"  # POPE's question, with a/an as POPE writes it
OBJECTS = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
# A fixed frequency prior (Zipf-like over a fixed ranking) and companions that share a colour
# or a shape with an object already placed: objects have a popularity and co-occur, which is
# what POPE's popular and adversarial negatives probe.
_RANKING = random.Random("shapes/prior").sample(OBJECTS, len(OBJECTS))
PRIOR = {o: 1.0 / (rank + 1) ** 0.7 for rank, o in enumerate(_RANKING)}
COMPANION_P = 0.5


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    cell: str

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def row(self) -> int:
        return CELLS.index(self.cell) // GRID

    @property
    def col(self) -> int:
        return CELLS.index(self.cell) % GRID


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]

    def count(self, shape: str) -> int:
        return sum(s.shape == shape for s in self.shapes)

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.shapes)

    @property
    def objects(self) -> list[str]:
        return [s.name for s in self.shapes]


def make_scene(rng: random.Random, min_shapes: int = 1) -> Scene:
    n = rng.randint(min_shapes, MAX_SHAPES)
    cells = rng.sample(CELLS, n)
    chosen: list[str] = []  # unique (colour, shape) objects
    while len(chosen) < n:
        pool = [o for o in OBJECTS if o not in chosen]
        if chosen and rng.random() < COMPANION_P:
            ref = rng.choice(chosen).split()
            pool = [o for o in pool if o.split()[0] == ref[0] or o.split()[1] == ref[1]]
        chosen.append(rng.choices(pool, weights=[PRIOR[o] for o in pool])[0])
    shapes = [Shape(*o.split(), cell) for o, cell in zip(chosen, cells)]
    # Reading order, so a caption lists the objects in one canonical order.
    return Scene(tuple(sorted(shapes, key=lambda s: CELLS.index(s.cell))))


def render(scene: Scene, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    rng = rng if rng is not None else random.Random(0)
    base = rng.randint(225, 245)
    background = tuple(min(255, base + rng.randint(-8, 8)) for _ in range(3))  # light grey/tint
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    cell = size / GRID
    for sh in scene.shapes:
        side = rng.uniform(0.6, 0.9) * cell
        # Small jitter: the shape stays inside its cell and always covers the cell centre
        # (a triangle's edges are 0.22*side from its box centre), which the tests rely on.
        jitter = min(0.08 * side, (cell - side) / 2)
        cx = (sh.col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (sh.row + 0.5) * cell + rng.uniform(-jitter, jitter)
        x0, y0, x1, y1 = (round(v) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        fill = COLORS[sh.color]
        if sh.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif sh.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(round(cx), y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def placed(s: Shape) -> str:
    return f"{_a(s.name)} in {s.cell}"


def caption(scene: Scene) -> str:
    parts = [placed(s) for s in scene.shapes]
    listed = parts[0] if len(parts) == 1 else "; ".join(parts[:-1]) + " and " + parts[-1]
    n = len(scene.shapes)
    head = "There is 1 shape" if n == 1 else f"There are {n} shapes"
    return f"{head}: {listed}."


def relation_holds(a: Shape, relation: str, b: Shape) -> bool:
    return {
        "left of": a.col < b.col,
        "right of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[relation]


def exist_question(name: str) -> str:
    return POPE_TEMPLATE.format(_a(name))


@functools.cache
def world_stats() -> ObjectStats:
    """Object frequencies and co-occurrences of the world (2,000 scenes of a fixed stream):
    what the training split's POPE-style negatives are sampled from."""
    rng = random.Random("shapes/stats")
    return ObjectStats.count([make_scene(rng).objects for _ in range(2000)], vocabulary=OBJECTS)


def applicable(scene: Scene) -> list[str]:
    """Question types that have an unambiguous question about this scene."""
    colors = [s.color for s in scene.shapes]
    types = []
    if any(scene.count(s.shape) == 1 for s in scene.shapes):
        types.append("color")
    if any(colors.count(c) == 1 for c in colors):
        types.append("shape")
    types += ["count", "position"]
    if len(scene.shapes) >= 2:
        types.append("relation")
    return types + ["exist"]


def ask(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """A random (question, answer) of one type, or None if the type does not apply."""
    shapes = scene.shapes
    if qtype == "color":
        unique = [s for s in shapes if scene.count(s.shape) == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        return f"What color is the {s.shape}?", s.color
    if qtype == "shape":
        colors = [s.color for s in shapes]
        unique = [s for s in shapes if colors.count(s.color) == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        return f"What shape is the {s.color} object?", s.shape
    if qtype == "count":
        if rng.random() < 0.5:
            return "How many shapes are there?", str(len(shapes))
        kind = rng.choice(SHAPES)
        return f"How many {kind}s are there?", str(scene.count(kind))
    if qtype == "position":
        s = rng.choice(shapes)
        return f"Where is the {s.name}?", s.cell
    if qtype == "relation":
        if len(shapes) < 2:
            return None
        a, b = rng.sample(shapes, 2)
        relation = rng.choice(RELATIONS)
        return f"Is the {a.name} {relation} the {b.name}?", "yes" if relation_holds(a, relation, b) else "no"
    if qtype == "exist":
        # POPE-style: a present object, or an absent one by one of POPE's three strategies.
        if rng.random() < 0.5:
            return exist_question(rng.choice(shapes).name), "yes"
        anchor, strategy = rng.choice(shapes).name, rng.choice(STRATEGIES)
        return exist_question(world_stats().negative(strategy, anchor, set(scene.objects), rng)), "no"
    raise ValueError(f"unknown question type '{qtype}' (known: {', '.join(QUESTION_TYPES)})")


def _turn(who: str, value: str) -> dict:
    return {"from": who, "value": value}


def _caption_sample(scene: Scene, rng: random.Random) -> dict:
    prompt = rng.choice(CAPTION_PROMPTS)
    return {"conversations": [_turn("human", "<image>\n" + prompt), _turn("gpt", caption(scene))]}


# The instruction split asks the spatial types (which read the grid) twice as often.
INSTRUCT_WEIGHTS = {"position": 2.0, "relation": 2.0}


def qa_turns(
    scene: Scene, rng: random.Random, n_turns: int, weights: dict[str, float] | None = None
) -> list[tuple[str, str]]:
    """Up to `n_turns` distinct (question, answer) pairs about one scene, of random types
    (uniform, or by `weights`, 1 for a type not named)."""
    types, pairs, asked = applicable(scene), [], set()
    for _ in range(50):  # bounded: a draw may repeat a question already asked
        if len(pairs) == n_turns:
            break
        qtype = rng.choice(types) if weights is None else rng.choices(types, [weights.get(t, 1.0) for t in types])[0]
        q, a = ask(scene, qtype, rng)
        if q not in asked:
            asked.add(q)
            pairs.append((q, a))
    return pairs


def _instruct_sample(scene: Scene, rng: random.Random) -> dict:
    # Several questions per image: more supervised answers per visual token processed.
    convs = []
    for q, a in qa_turns(scene, rng, rng.randint(3, 6), INSTRUCT_WEIGHTS):
        convs += [_turn("human", ("<image>\n" if not convs else "") + q), _turn("gpt", a)]
    return {"conversations": convs}


EVAL_TYPES = tuple(t for t in QUESTION_TYPES if t != "exist")  # exist: the POPE splits


def _eval_sample(i: int, rng: random.Random) -> tuple[Scene, dict]:
    # Round robin over types and over each type's answers: balanced, so the chance level
    # 1/len(choices) is also the best a constant answer can score.
    qtype = EVAL_TYPES[i % len(EVAL_TYPES)]
    target = CHOICES[qtype][(i // len(EVAL_TYPES)) % len(CHOICES[qtype])]
    while True:
        scene = make_scene(rng)
        qa = ask(scene, qtype, rng)
        if qa is not None and qa[1] == target:
            break
    return scene, _question(qa[0], target, qtype)


def _question(question: str, answer: str, qtype: str, **extra) -> dict:
    return {
        "conversations": [_turn("human", "<image>\n" + question), _turn("gpt", answer)],
        "question_type": qtype,
        "answer": answer,
        "choices": CHOICES[qtype],
        **extra,
    }


def _rng(seed: int, stream: str) -> random.Random:
    # str seeds are hashed with SHA-512: stable across runs and independent per stream.
    return random.Random(f"shapes/{seed}/{stream}")


def _generate(out: Path, split: str, n: int, seed: int, image_size: int) -> list[dict]:
    rng, samples = _rng(seed, split), []
    for i in range(n):
        if split == "eval":
            scene, sample = _eval_sample(i, rng)
        else:
            scene = make_scene(rng)
            sample = (_caption_sample if split == "caption" else _instruct_sample)(scene, rng)
        name = f"{split}-{i:05d}"
        render(scene, image_size, rng).save(out / "images" / f"{name}.png")
        samples.append({"id": name, "image": f"images/{name}.png", **sample})
    return samples


def _generate_pope(out: Path, n_images: int, seed: int, image_size: int) -> list[dict]:
    """POPE on shapes: `n_images` scenes of 3+ objects, each asked about 3 present objects and
    3 absent ones per strategy, the statistics counted over these images (as POPE does)."""
    rng = _rng(seed, "pope")
    scenes = [make_scene(rng, min_shapes=3) for _ in range(n_images)]
    stats = ObjectStats.count([s.objects for s in scenes], vocabulary=OBJECTS)
    samples = []
    for i, scene in enumerate(scenes):
        image = f"images/pope-{i:05d}.png"
        render(scene, image_size, rng).save(out / image)
        objects = rng.sample(scene.objects, len(scene.objects))  # which 3 are asked
        for strategy in STRATEGIES:
            for j, (obj, label) in enumerate(pope_questions(objects, stats, strategy, rng)):
                question = _question(exist_question(obj), label, "exist", pope_split=strategy)
                samples.append({"id": f"pope-{strategy}-{i:05d}-{j}", "image": image, **question})
    return samples


def _read_meta(root: Path) -> dict | None:
    try:
        return json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def write_shapes_dataset(
    root: str | Path,
    *,
    seed: int = 0,
    n_caption: int = 2000,
    n_instruct: int = 2000,
    n_eval: int = 300,
    n_pope: int = 16,
    image_size: int = 64,
) -> dict[str, Path]:
    """Write (or reuse) the dataset under `root`; returns the split JSONs and the image root."""
    root = Path(root)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "seed": seed,
        "n_caption": n_caption,
        "n_instruct": n_instruct,
        "n_eval": n_eval,
        "n_pope": n_pope,
        "image_size": int(image_size),
    }
    paths = {
        "caption": root / "caption.json",
        "instruct": root / "instruct.json",
        "eval": root / "eval.json",
        "images": root,
    }
    if _read_meta(root) == meta and all(p.exists() for p in paths.values()):
        return paths
    old_meta = _read_meta(root)
    if root.exists() and any(root.iterdir()) and (old_meta or {}).get("format") != FORMAT:
        raise FileExistsError(f"'{root}' exists and is not a shapes dataset; refusing to replace it")

    # Build beside root and rename into place: an interrupted run never leaves half a dataset.
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        (tmp / "images").mkdir()
        for split, n in (("caption", n_caption), ("instruct", n_instruct), ("eval", n_eval)):
            samples = _generate(tmp, split, n, seed, int(image_size))
            if split == "eval":
                samples += _generate_pope(tmp, n_pope, seed, int(image_size))
            (tmp / f"{split}.json").write_text(json.dumps(samples, indent=1))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        stale = None
        if root.exists():  # other parameters or an older format
            stale = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(root, stale)
        try:
            os.replace(tmp, root)
        except OSError:
            if _read_meta(root) != meta:  # not another process finishing the same job first
                raise
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def corpus(seed: int = 0, n: int = 2000) -> Iterator[str]:
    """All the text the dataset can contain (prompts, captions, questions, answers),
    for training a tokenizer."""
    yield from CAPTION_PROMPTS
    for answers in CHOICES.values():
        yield from answers
    rng = _rng(seed, "corpus")
    for _ in range(n):
        scene = make_scene(rng)
        yield caption(scene)
        for qtype in applicable(scene):
            yield from ask(scene, qtype, rng)
