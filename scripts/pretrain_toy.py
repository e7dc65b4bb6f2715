"""Pretrain the toy preset's backbones on the shapes world: `tinylmm/assets/toy/`.

Two directories in the layout of a hub checkpoint (config.json, model.safetensors, and the
tokenizer or the image preprocessing), loaded by `from_pretrained` like any hub model
(`builtin:toy-llm`, `builtin:toy-siglip`), and a `manifest.json` beside them (seed, data
sizes, steps, losses reached, held-out scores, sha256 of every file).

- **The LLM** (LLaMA architecture, the toy tokenizer) learns the world from *text*: a scene,
  then questions about it and their answers in the toy's chat template (TinyLLaVA's
  `llama`), captions, and plain-format captions (the pretrain template's), encoded by the
  LMM's own processor. In most documents the scene sits where the LMM puts the image, as
  16 slots in reading order (`CellSlots`: a cell's words " red" + " circle" summed, plus
  row and column vectors); in the rest it is written in words. Only the answers and
  captions are supervised, as in instruction tuning: the skill is answering from what the
  context holds, and in the LMM the connector only has to put each patch's content there.
  Counting, relations and absence are worked out from the slots, never stated.
- **The vision tower** (SigLIP architecture) learns with SigLIP's own objective, the
  pairwise sigmoid image-text loss (Zhai et al. 2023; transformers' `SiglipModel`
  `return_loss=True`), on freshly rendered shapes images and their captions. The text side
  is a small SigLIP text tower used only here; only the vision tower is kept.

Deterministic from `--seed` on one machine (data streams are seeded `random.Random`s, torch
is seeded, and the thread count is fixed; the manifest records it per part). The full run
takes about half an hour on 2 CPU cores; the manifest records each part's wall time.

    python scripts/pretrain_toy.py                      # rebuild tinylmm/assets/toy
    python scripts/pretrain_toy.py --out /tmp/toy --llm-steps 20 --tower-steps 20   # a quick try
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_toy_tokenizer import build as build_tokenizer  # noqa: E402

from tinylmm.data import shapes  # noqa: E402
from tinylmm.data.processor import Encoded, ImageProcessor, Processor, collate  # noqa: E402
from tinylmm.data.templates import IMAGE_TOKEN  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tinylmm" / "assets" / "toy"
IGNORE = -100

LLM_CONFIG = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
IMAGE_SIZE, PATCH_SIZE = 64, 16  # a 4 x 4 grid of visual tokens, one per cell of the shapes grid
VISION_CONFIG = dict(
    hidden_size=96,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=3,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
)
CAPTION_LEN = 48  # SigLIP pads every text to one length and pools the last position
TEXT_CONFIG = dict(
    vocab_size=512,
    hidden_size=96,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=3,
    max_position_embeddings=CAPTION_LEN,
    pad_token_id=3,
)


# --- the LLM's text world ------------------------------------------------------------------

# Most documents hold the scene where the LMM will put the image, in the form the LMM will
# put it there: GRID x GRID slots in reading order at the image's token positions, one per
# cell (what one visual token of the tower covers). A slot's vector is the sum of its
# object's word embeddings (" red" + " circle", or a learnt `empty` vector) and learnt row
# and column vectors: a visual token carries its patch's content and, through the tower's
# position embeddings, its place; LLaMA's RoPE gives no absolute place of its own. The
# slot vectors are kept only here: in the LMM the connector learns to produce them. The
# other documents describe the scene in words.
CELL_DOCUMENTS = 0.85
# The spatial types read two keys and the grid: asked more often, as the instruction split does.
LLM_QUESTION_WEIGHTS = {"position": 3.0, "relation": 3.0}


class CellSlots(torch.nn.Module):
    """The scene as GRID * GRID vectors: content word embeddings + row + column vectors."""

    def __init__(self, hidden: int):
        super().__init__()
        self.row = torch.nn.Parameter(torch.randn(shapes.GRID, hidden) * 0.02)
        self.col = torch.nn.Parameter(torch.randn(shapes.GRID, hidden) * 0.02)
        self.empty = torch.nn.Parameter(torch.randn(hidden) * 0.02)

    def forward(self, words: torch.nn.Embedding, content: torch.Tensor) -> torch.Tensor:
        """content [n, GRID*GRID, 2]: the colour's and the shape's token id, -1 in an empty cell."""
        filled = (content[..., 0] >= 0).unsqueeze(-1)
        objects = words(content.clamp(min=0)).sum(-2)
        place = (self.row[:, None] + self.col[None, :]).reshape(-1, self.row.shape[-1])
        return torch.where(filled, objects, self.empty) + place


def cell_content(scene: shapes.Scene, word_id) -> list[list[int]]:
    content = [[-1, -1] for _ in shapes.CELLS]
    for s in scene.shapes:
        content[shapes.CELLS.index(s.cell)] = [word_id(s.color), word_id(s.shape)]
    return content


def describe(scene: shapes.Scene, rng: random.Random) -> str:
    """The scene in words, objects in a random order, their number unstated."""
    return "; ".join(shapes.placed(s) for s in rng.sample(scene.shapes, len(scene.shapes))) + "."


def document_turns(scene: shapes.Scene, rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """One document as (template, turns) with `<image>` where the scene goes: a chat of
    questions or a caption request, or the pretrain template's image-then-caption."""
    kind = rng.random()
    if kind < 0.15:
        return "pretrain", [("human", IMAGE_TOKEN), ("gpt", shapes.caption(scene))]
    if kind < 0.3:
        turns = [(rng.choice(shapes.CAPTION_PROMPTS), shapes.caption(scene))]
    else:
        turns = shapes.qa_turns(scene, rng, rng.randint(1, 6), LLM_QUESTION_WEIGHTS)
    convs = []
    for i, (q, a) in enumerate(turns):
        convs += [("human", (IMAGE_TOKEN + "\n" if i == 0 else "") + q), ("gpt", a)]
    return "llama", convs


class TextWorld:
    """Encodes documents exactly as the LMM's processor encodes its samples (the toy's
    template, `<image>` expanded to GRID * GRID positions), then fills the image positions
    with the scene's slots, or writes the scene in words in place of `<image>`."""

    def __init__(self, tokenizer):
        self.processor = Processor(
            build_tokenizer(), ImageProcessor(IMAGE_SIZE, [0.5] * 3, [0.5] * 3), "llama", len(shapes.CELLS)
        )
        self.image_id = self.processor.image_token_id
        self.pad_id = tokenizer.pad_token_id

        def word_id(word: str) -> int:
            (i,) = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            return i

        self.word_id = word_id

    def encode(self, scene: shapes.Scene, template: str, turns, rng: random.Random, cells: bool):
        if not cells:
            turns = [(r, t.replace(IMAGE_TOKEN, describe(scene, rng))) for r, t in turns]
        enc = self.processor.encode(turns, self.processor.get_template(template))
        return enc.input_ids, enc.labels, cell_content(scene, self.word_id) if cells else None

    def documents(self, n: int, rng: random.Random) -> list:
        docs = []
        for _ in range(n):
            scene = shapes.make_scene(rng)
            template, turns = document_turns(scene, rng)
            docs.append(self.encode(scene, template, turns, rng, cells=rng.random() < CELL_DOCUMENTS))
        return docs

    def batch(self, docs):
        """Right-padded like the LMM's batches (the processor's `collate`), and the slots' content."""
        padded = collate([Encoded(ids, labels, 0) for ids, labels, _ in docs], [], self.pad_id)
        content = torch.tensor([c for _, _, c in docs if c is not None], dtype=torch.long).reshape(
            -1, len(shapes.CELLS), 2
        )
        return padded["input_ids"], padded["labels"], padded["attention_mask"], content

    def embed(self, model, slots: CellSlots, ids, content) -> torch.Tensor:
        words = model.get_input_embeddings()
        is_image = ids == self.image_id
        x = words(ids.masked_fill(is_image, 0))
        if content.numel():
            filled = slots(words, content).reshape(-1, x.shape[-1])
            x = x.masked_scatter(is_image.unsqueeze(-1), filled)
        return x


def length_buckets(docs, batch: int, rng: random.Random, pool: int = 50):
    """Endless batches of documents of similar lengths (little padding): draw `pool`
    batches' worth, sort them by length, cut, and serve the cuts in a random order."""
    while True:
        drawn = sorted(rng.sample(docs, min(len(docs), batch * pool)), key=lambda d: len(d[0]))
        cuts = [drawn[i : i + batch] for i in range(0, len(drawn), batch)]
        rng.shuffle(cuts)
        yield from cuts


def lm_loss(model, world: TextWorld, slots: CellSlots, ids, labels, mask, content) -> torch.Tensor:
    embeds = world.embed(model, slots, ids, content)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)


@torch.no_grad()
def text_qa_accuracy(model, world: TextWorld, slots, n_scenes: int, rng: random.Random, cells: bool = True):
    """Held-out answers under teacher forcing: an answer counts when every token of it and
    its `</s>` is the argmax (what greedy decoding would produce), per question type."""
    model.eval()
    right, total = {t: 0 for t in shapes.QUESTION_TYPES}, {t: 0 for t in shapes.QUESTION_TYPES}
    for _ in range(n_scenes):
        scene = shapes.make_scene(rng)
        qtype = rng.choice(shapes.applicable(scene))
        q, a = shapes.ask(scene, qtype, rng)
        ids, labels, mask, content = world.batch(
            [world.encode(scene, "llama", [("human", IMAGE_TOKEN + "\n" + q), ("gpt", a)], rng, cells)]
        )
        pred = model(inputs_embeds=world.embed(model, slots, ids, content)).logits[0, :-1].argmax(-1)
        target = labels[0, 1:]
        keep = target != IGNORE
        right[qtype] += bool((pred[keep] == target[keep]).all())
        total[qtype] += 1
    model.train()
    return {t: round(right[t] / total[t], 4) for t in total if total[t]}


def pretrain_llm(
    out: Path,
    tokenizer,
    *,
    seed: int,
    steps: int,
    batch: int,
    n_docs: int,
    lr: float,
    heldout: int,
    probe_every: int = 0,
) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{k: v for k, v in LLM_CONFIG.items() if k != "model_type"})
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    slots = CellSlots(cfg.hidden_size)
    world = TextWorld(tokenizer)
    docs = world.documents(n_docs, random.Random(f"toy-llm/{seed}/docs"))
    order = random.Random(f"toy-llm/{seed}/order")
    params = [*model.parameters(), *slots.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, warmup, steps))
    losses, batches = [], length_buckets(docs, batch, order)
    t0 = time.perf_counter()
    for step in range(steps):
        loss = lm_loss(model, world, slots, *world.batch(next(batches)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            seconds = time.perf_counter() - t0
            print(
                f"  llm step {step + 1}/{steps} answer loss {np.mean(losses[-50:]):.4f} ({seconds:.0f} s)", flush=True
            )
        if probe_every and step and step % probe_every == 0:  # its own questions: the training draws nothing more
            print("    probe:", text_qa_accuracy(model, world, slots, 300, random.Random("toy-llm/probe")), flush=True)
    accuracy = text_qa_accuracy(model, world, slots, heldout, random.Random(f"toy-llm/{seed}/heldout"))
    words = text_qa_accuracy(model, world, slots, heldout, random.Random(f"toy-llm/{seed}/heldout"), cells=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "steps": steps,
        "batch_size": batch,
        "documents": n_docs,
        "lr": lr,
        "answer_loss_first": round(losses[0], 4),
        "answer_loss_last": round(float(np.mean(losses[-20:])), 4),
        "heldout_questions": heldout,
        "heldout_text_answer_accuracy": accuracy,
        "heldout_text_answer_accuracy_words": words,
    }


# --- the vision tower ------------------------------------------------------------------------


def cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def image_batch(n: int, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    pixels, captions = [], []
    for _ in range(n):
        scene = shapes.make_scene(rng)
        img = shapes.render(scene, IMAGE_SIZE, rng)
        pixels.append(np.asarray(img, dtype=np.float32))
        captions.append(shapes.caption(scene))
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 255.0
    return (x - 0.5) / 0.5, captions  # SigLIP's preprocessing: mean = std = 0.5


def caption_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    enc = tokenizer(captions, padding="max_length", max_length=CAPTION_LEN, truncation=True, add_special_tokens=False)
    return torch.tensor(enc["input_ids"])


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, n: int, rng: random.Random) -> float:
    """Image -> caption top-1 among `n` held-out pairs."""
    model.eval()
    pixels, captions = image_batch(n, rng)
    outs = model(input_ids=caption_ids(tokenizer, captions), pixel_values=pixels)
    model.train()
    hits = outs.logits_per_image.argmax(-1) == torch.arange(n)
    # Identical captions (two one-object scenes alike) count as a hit.
    same = [captions[j] == captions[i] for i, j in enumerate(outs.logits_per_image.argmax(-1).tolist())]
    return round(sum(bool(h) or s for h, s in zip(hits, same)) / n, 4)


def pretrain_tower(out: Path, tokenizer, *, seed: int, steps: int, batch: int, lr: float, heldout: int) -> dict:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipVisionModel

    torch.manual_seed(seed)
    cfg = SiglipConfig(text_config=TEXT_CONFIG | {"bos_token_id": 1, "eos_token_id": 2}, vision_config=VISION_CONFIG)
    model = SiglipModel(cfg)
    with torch.no_grad():  # SigLIP's initialisation of the loss' temperature and bias: t' = log 10, b = -10
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    rng = random.Random(f"toy-siglip/{seed}/train")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, warmup, steps))
    losses = []
    for step in range(steps):
        pixels, captions = image_batch(batch, rng)
        loss = model(input_ids=caption_ids(tokenizer, captions), pixel_values=pixels, return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            print(f"  tower step {step + 1}/{steps} sigmoid loss {loss.item():.4f}", flush=True)
    accuracy = retrieval_accuracy(model, tokenizer, heldout, random.Random(f"toy-siglip/{seed}/heldout"))
    tower = SiglipVisionModel(cfg.vision_config)
    getattr(tower, "vision_model", tower).load_state_dict(
        model.vision_model.state_dict()
    )  # transformers 5 flattened it
    tower.save_pretrained(out)
    SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(out)
    return {
        "steps": steps,
        "batch_size": batch,
        "images": steps * batch,
        "lr": lr,
        "sigmoid_loss_first": round(losses[0], 4),
        "sigmoid_loss_last": round(float(np.mean(losses[-20:])), 4),
        "heldout_pairs": heldout,
        "heldout_image_to_caption_top1": accuracy,
    }


# --- the manifest ----------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llm-steps", type=int, default=3000)
    ap.add_argument("--llm-docs", type=int, default=60000)
    ap.add_argument("--llm-batch-size", type=int, default=64)
    ap.add_argument("--llm-lr", type=float, default=2e-3)
    ap.add_argument("--probe-every", type=int, default=0, help="print held-out LLM answers every N steps")
    ap.add_argument("--tower-steps", type=int, default=800)
    ap.add_argument("--tower-batch-size", type=int, default=128)
    ap.add_argument("--part", choices=["all", "llm", "siglip"], default="all", help="rebuild one part only")
    ap.add_argument("--tower-lr", type=float, default=1e-3)
    ap.add_argument("--heldout", type=int, default=600, help="held-out text questions (images: 256)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the same number gives the same bytes)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    command = "python scripts/pretrain_toy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    made, wall = {}, {}
    for part in ("llm", "siglip") if args.part == "all" else (args.part,):
        t0 = time.perf_counter()
        if part == "llm":
            print(f"toy LLM: {args.llm_steps} steps on {args.llm_docs} text documents", flush=True)
            made["llm"] = pretrain_llm(
                args.out / "llm",
                tokenizer,
                seed=args.seed,
                steps=args.llm_steps,
                batch=args.llm_batch_size,
                n_docs=args.llm_docs,
                lr=args.llm_lr,
                heldout=args.heldout,
                probe_every=args.probe_every,
            )
        else:
            print(f"toy SigLIP tower: {args.tower_steps} steps", flush=True)
            made["siglip"] = pretrain_tower(
                args.out / "siglip",
                tokenizer,
                seed=args.seed,
                steps=args.tower_steps,
                batch=args.tower_batch_size,
                lr=args.tower_lr,
                heldout=min(256, args.heldout),
            )
        wall[part] = round(time.perf_counter() - t0, 1)
    # Read the manifest only now: the two parts may be rebuilt by two processes at once.
    path = args.out / "manifest.json"
    old = json.loads(path.read_text()) if args.part != "all" and path.exists() else {}
    if old.get("seed", args.seed) != args.seed:
        raise SystemExit(f"{path} was made with another seed; rebuild both parts (--part all)")
    threads = old.get("threads", {})
    if isinstance(threads, int):  # an older manifest: one count for both parts
        threads = {"llm": threads, "siglip": threads}
    manifest = {
        "seed": args.seed,
        # per part: float sums depend on the thread count, so the same count gives the same bytes
        "threads": {**threads, **dict.fromkeys(made, args.threads)},
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "commands": {**old.get("commands", {}), **dict.fromkeys(made, command)},
        "wall_s": {**old.get("wall_s", {}), **wall},
        **{k: old[k] for k in ("llm", "siglip") if k in old},
        **made,
    }
    manifest["sha256"] = file_hashes(args.out)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({k: manifest[k] for k in ("wall_s", "llm", "siglip") if k in manifest}, indent=2))
    return manifest


if __name__ == "__main__":
    main()
