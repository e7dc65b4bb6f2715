"""`shapes`: a built-in synthetic dataset that a tiny LMM can learn on a CPU in minutes.

Each image holds 1-3 coloured shapes, each in its own cell of a 2x2 grid. Captions and
questions are generated from the same `Scene` that is rendered, so every answer is true by
construction. Each question type has a fixed answer set (`CHOICES`), which gives the eval
split its chance level. Pure Python + PIL, deterministic from a seed: every split draws
from its own `random.Random`, never the global RNG.

    paths = write_shapes_dataset("data/shapes", seed=0)   # LLaVA-format JSON + PNGs
"""

from __future__ import annotations

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

FORMAT = "tinylmm-shapes"
FORMAT_VERSION = 2

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")  # row-major 2x2 grid
QUESTION_TYPES = ("color", "shape", "count", "position", "exist")
CHOICES: dict[str, list[str]] = {
    "color": list(COLORS),
    "shape": list(SHAPES),
    "count": ["0", "1", "2", "3"],
    "position": list(CELLS),
    "exist": ["yes", "no"],
}
CAPTION_PROMPTS = (
    "Describe the image.",
    "What is in the image?",
    "Describe the shapes in this picture.",
    "Give a short description of the image.",
)


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    cell: str

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]

    def count(self, shape: str) -> int:
        return sum(s.shape == shape for s in self.shapes)

    def has(self, color: str, shape: str) -> bool:
        return any(s.color == color and s.shape == shape for s in self.shapes)


def make_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, 3)
    cells = rng.sample(CELLS, n)
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)  # unique (colour, shape)
    shapes = [Shape(c, s, cell) for (c, s), cell in zip(pairs, cells)]
    # Reading order, so a caption lists the objects in one canonical order.
    return Scene(tuple(sorted(shapes, key=lambda s: CELLS.index(s.cell))))


def render(scene: Scene, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    rng = rng if rng is not None else random.Random(0)
    base = rng.randint(225, 245)
    background = tuple(min(255, base + rng.randint(-8, 8)) for _ in range(3))  # light grey/tint
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    cell = size / 2
    for sh in scene.shapes:
        row, col = divmod(CELLS.index(sh.cell), 2)
        side = rng.uniform(0.55, 0.85) * cell
        # Small jitter: the shape stays inside its cell and always covers the cell centre
        # (a triangle's edges are 0.22*side from its box centre), which the tests rely on.
        jitter = min(0.08 * side, (cell - side) / 2)
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
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


def caption(scene: Scene) -> str:
    parts = [f"{_a(s.name)} at the {s.cell}" for s in scene.shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(scene.shapes)
    head = "There is 1 shape" if n == 1 else f"There are {n} shapes"
    return f"{head}: {listed}."


def applicable(scene: Scene) -> list[str]:
    """Question types that have an unambiguous question about this scene."""
    colors = [s.color for s in scene.shapes]
    types = []
    if any(scene.count(s.shape) == 1 for s in scene.shapes):
        types.append("color")
    if any(colors.count(c) == 1 for c in colors):
        types.append("shape")
    return types + ["count", "position", "exist"]


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
    if qtype == "exist":
        yes = rng.random() < 0.5
        if yes:
            s = rng.choice(shapes)
            color, kind = s.color, s.shape
        elif rng.random() < 0.5:
            # POPE-style hard negative: shares the colour or the shape of a present object.
            s = rng.choice(shapes)
            near = [(s.color, k) for k in SHAPES] + [(c, s.shape) for c in COLORS]
            color, kind = rng.choice([p for p in near if not scene.has(*p)])
        else:
            color, kind = rng.choice([(c, k) for c in COLORS for k in SHAPES if not scene.has(c, k)])
        return f"Is there {_a(color)} {kind}?", "yes" if yes else "no"
    raise ValueError(f"unknown question type '{qtype}' (known: {', '.join(QUESTION_TYPES)})")


def _turn(who: str, value: str) -> dict:
    return {"from": who, "value": value}


def _caption_sample(scene: Scene, rng: random.Random) -> dict:
    prompt = rng.choice(CAPTION_PROMPTS)
    return {"conversations": [_turn("human", "<image>\n" + prompt), _turn("gpt", caption(scene))]}


def _instruct_sample(scene: Scene, rng: random.Random) -> dict:
    # Several questions per image: more supervised answers per visual token processed.
    n_turns, types = rng.randint(3, 6), applicable(scene)
    convs, asked = [], set()
    for _ in range(50):  # bounded: a draw may repeat a question already asked
        if len(asked) == n_turns:
            break
        q, a = ask(scene, rng.choice(types), rng)
        if q in asked:
            continue
        asked.add(q)
        convs += [_turn("human", ("<image>\n" if not convs else "") + q), _turn("gpt", a)]
    return {"conversations": convs}


def _eval_sample(i: int, rng: random.Random) -> tuple[Scene, dict]:
    # Round robin over types and over each type's answers: balanced, so the chance level
    # 1/len(choices) is also the best a constant answer can score.
    qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
    target = CHOICES[qtype][(i // len(QUESTION_TYPES)) % len(CHOICES[qtype])]
    while True:
        scene = make_scene(rng)
        qa = ask(scene, qtype, rng)
        if qa is not None and qa[1] == target:
            break
    sample = {
        "conversations": [_turn("human", "<image>\n" + qa[0]), _turn("gpt", target)],
        "question_type": qtype,
        "answer": target,
        "choices": CHOICES[qtype],
    }
    return scene, sample


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
