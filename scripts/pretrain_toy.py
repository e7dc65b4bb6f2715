"""Pretrain the toy preset's backbones on the shapes world: `tinylmm/assets/toy/`.

Two directories in the layout of a hub checkpoint (config.json, model.safetensors, and the
tokenizer or the image preprocessing), loaded by `from_pretrained` like any hub model
(`builtin:toy-llm`, `builtin:toy-siglip`), and a `manifest.json` beside them (seed, data
sizes, steps, losses reached, held-out scores, sha256 of every file).

- **The LLM** (LLaMA architecture, the toy tokenizer) learns the world from *text*: a scene
  described in words where the image will later be, then questions about it and their
  answers in the toy's chat template (TinyLLaVA's `llama`), captions, and plain-format
  captions (the pretrain template's). Only the answers and captions are supervised, as in
  instruction tuning: the skill is answering from what the context holds. The description
  lists the objects in a random order and never states their number, so counting, reading
  order and relations are worked out from the content, not copied.
- **The vision tower** (SigLIP architecture) learns with SigLIP's own objective, the
  pairwise sigmoid image-text loss (Zhai et al. 2023; transformers' `SiglipModel`
  `return_loss=True`), on freshly rendered shapes images and their captions. The text side
  is a small SigLIP text tower used only here; only the vision tower is kept.

Deterministic from `--seed` on one machine (data streams are seeded `random.Random`s, torch
is seeded, and the thread count is fixed). The full run takes a few minutes on 2 CPU cores; the
manifest records its wall time.

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
from tinylmm.data.templates import get_template, tokenize_with_labels  # noqa: E402

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


def describe(scene: shapes.Scene, rng: random.Random) -> str:
    """The scene in words, objects in a random order, their number unstated."""
    return "; ".join(shapes.placed(s) for s in rng.sample(scene.shapes, len(scene.shapes))) + "."


def text_document(scene: shapes.Scene, rng: random.Random) -> tuple[str, list[tuple[int, int]]]:
    """One training text and its supervised character spans: a chat about the described
    scene (questions, or a caption request), or a plain-format caption."""
    desc = describe(scene, rng)
    kind = rng.random()
    if kind < 0.15:  # the pretrain template's layout: the image (here its description), the caption
        return _plain(desc, shapes.caption(scene))
    if kind < 0.3:
        turns = [(rng.choice(shapes.CAPTION_PROMPTS), shapes.caption(scene))]
    else:
        turns = shapes.qa_turns(scene, rng, rng.randint(1, 6))
    convs = []
    for i, (q, a) in enumerate(turns):
        convs += [("human", (desc + "\n" if i == 0 else "") + q), ("gpt", a)]
    return get_template("llama").render(convs, eos="</s>")


def _plain(desc: str, caption: str) -> tuple[str, list[tuple[int, int]]]:
    text = desc + "\n"
    return text + caption + "\n", [(len(text), len(text) + len(caption) + 1)]


def encode_documents(tokenizer, n: int, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    docs = []
    for _ in range(n):
        text, spans = text_document(shapes.make_scene(rng), rng)
        ids, labels, _ = tokenize_with_labels(tokenizer, text, spans)
        docs.append((ids, labels))
    return docs


def pad_batch(docs, pad_id: int):
    width = max(len(ids) for ids, _ in docs)
    ids = torch.full((len(docs), width), pad_id)
    labels = torch.full((len(docs), width), IGNORE)
    mask = torch.zeros((len(docs), width), dtype=torch.long)
    for i, (x, y) in enumerate(docs):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def length_buckets(docs, batch: int, rng: random.Random, pool: int = 50):
    """Endless batches of documents of similar lengths (little padding): draw `pool`
    batches' worth, sort them by length, cut, and serve the cuts in a random order."""
    while True:
        drawn = sorted(rng.sample(docs, min(len(docs), batch * pool)), key=lambda d: len(d[0]))
        cuts = [drawn[i : i + batch] for i in range(0, len(drawn), batch)]
        rng.shuffle(cuts)
        yield from cuts


def lm_loss(model, ids, labels, mask) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)


@torch.no_grad()
def text_qa_accuracy(model, tokenizer, n_scenes: int, rng: random.Random) -> dict[str, float]:
    """Held-out answers under teacher forcing: an answer counts when every token of it and
    its `</s>` is the argmax (what greedy decoding would produce), per question type."""
    model.eval()
    right, total = {t: 0 for t in shapes.QUESTION_TYPES}, {t: 0 for t in shapes.QUESTION_TYPES}
    template = get_template("llama")
    for _ in range(n_scenes):
        scene = shapes.make_scene(rng)
        qtype = rng.choice(shapes.applicable(scene))
        q, a = shapes.ask(scene, qtype, rng)
        text, spans = template.render([("human", describe(scene, rng) + "\n" + q), ("gpt", a)], eos="</s>")
        ids, labels, _ = tokenize_with_labels(tokenizer, text, spans)
        ids_t, labels_t = torch.tensor([ids]), torch.tensor([labels])
        pred = model(input_ids=ids_t).logits[0, :-1].argmax(-1)
        target = labels_t[0, 1:]
        keep = target != IGNORE
        right[qtype] += bool((pred[keep] == target[keep]).all())
        total[qtype] += 1
    model.train()
    return {t: round(right[t] / total[t], 4) for t in total if total[t]}


def pretrain_llm(
    out: Path, tokenizer, *, seed: int, steps: int, batch: int, n_docs: int, lr: float, heldout: int
) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{k: v for k, v in LLM_CONFIG.items() if k != "model_type"})
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    docs = encode_documents(tokenizer, n_docs, random.Random(f"toy-llm/{seed}/docs"))
    order = random.Random(f"toy-llm/{seed}/order")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, warmup, steps))
    losses, batches = [], length_buckets(docs, batch, order)
    for step in range(steps):
        loss = lm_loss(model, *pad_batch(next(batches), tokenizer.pad_token_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            print(f"  llm step {step + 1}/{steps} answer loss {loss.item():.4f}", flush=True)
    accuracy = text_qa_accuracy(model, tokenizer, heldout, random.Random(f"toy-llm/{seed}/heldout"))
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
    ap.add_argument("--llm-steps", type=int, default=1600)
    ap.add_argument("--llm-docs", type=int, default=40000)
    ap.add_argument("--tower-steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=32)
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
                batch=args.batch_size,
                n_docs=args.llm_docs,
                lr=3e-3,
                heldout=args.heldout,
            )
        else:
            print(f"toy SigLIP tower: {args.tower_steps} steps", flush=True)
            made["siglip"] = pretrain_tower(
                args.out / "siglip",
                tokenizer,
                seed=args.seed,
                steps=args.tower_steps,
                batch=4 * args.batch_size,
                lr=args.tower_lr,
                heldout=min(256, args.heldout),
            )
        wall[part] = round(time.perf_counter() - t0, 1)
    # Read the manifest only now: the two parts may be rebuilt by two processes at once.
    path = args.out / "manifest.json"
    old = json.loads(path.read_text()) if args.part != "all" and path.exists() else {}
    if old.get("seed", args.seed) != args.seed or old.get("threads", args.threads) != args.threads:
        raise SystemExit(f"{path} was made with another seed or thread count; rebuild both parts (--part all)")
    manifest = {
        "seed": args.seed,
        "threads": args.threads,
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
