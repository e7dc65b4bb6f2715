"""Hold the memory planner (tinylmm/memory/) to measurements on this CPU.

    python bench/memory_check.py            # all sections, a few minutes on 2 cores
    python bench/memory_check.py counts acts peak storage table

Sections:
  counts   parameter counts of the embedded architectures vs the published ones
  acts     activation bytes: the planner's estimate vs the storages autograd saves for
           backward (torch.autograd.graph.saved_tensors_hooks), with and without gradient
           checkpointing, fp32 and bf16 autocast, LLaMA/Phi/StableLM + SigLIP/CLIP, LoRA
           and QLoRA LLMs (peft + bitsandbytes)
  peak     the planned total (device="cpu": no CUDA overhead) vs the peak of live tensor
           bytes over a whole training step (two accumulated micro-batches + optimizer
           step, run as the training loop runs it), tracked op by op with a TorchDispatchMode
  storage  weights / gradients / optimizer states vs tensor bytes after an optimizer step
  table    the README table: each TinyLLaVA preset x recipe x stage at seq 2048 on a 24 GB GPU

The measurements plan the LM head at the positions the measured batch supervises
(`logit_positions`); the table plans the default, every text position. The helpers that
build a stage's model and measure it are tinylmm.memory.measure (shared with
tests/test_memory.py).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinylmm import memory as mem  # noqa: E402
from tinylmm.config import resolve  # noqa: E402
from tinylmm.train import measure  # noqa: E402

MiB = 2**20

LLAMA_MID = (
    "{model_type: llama, vocab_size: 4096, hidden_size: 512, intermediate_size: 1376, num_hidden_layers: 4, "
    "num_attention_heads: 8, num_key_value_heads: 4, max_position_embeddings: 1024, tie_word_embeddings: false, "
    "bos_token_id: 1, eos_token_id: 2, pad_token_id: 3}"
)
LLAMA_BIG = (
    "{model_type: llama, vocab_size: 8192, hidden_size: 1024, intermediate_size: 2816, num_hidden_layers: 8, "
    "num_attention_heads: 16, num_key_value_heads: 4, max_position_embeddings: 2048, tie_word_embeddings: false, "
    "bos_token_id: 1, eos_token_id: 2, pad_token_id: 3}"
)
PHI_MID = (
    "{model_type: phi, vocab_size: 4096, hidden_size: 640, intermediate_size: 2560, num_hidden_layers: 3, "
    "num_attention_heads: 8, partial_rotary_factor: 0.4, resid_pdrop: 0.1, max_position_embeddings: 1024, "
    "tie_word_embeddings: false, bos_token_id: 1, eos_token_id: 2, pad_token_id: 3}"
)
STABLELM_MID = (
    "{model_type: stablelm, vocab_size: 4096, hidden_size: 512, intermediate_size: 1376, num_hidden_layers: 3, "
    "num_attention_heads: 8, num_key_value_heads: 8, partial_rotary_factor: 0.25, use_qkv_bias: true, "
    "max_position_embeddings: 1024, tie_word_embeddings: false, bos_token_id: 1, eos_token_id: 2, pad_token_id: 3}"
)
SIGLIP_MID = (
    "{model_type: siglip_vision_model, hidden_size: 384, intermediate_size: 1536, num_hidden_layers: 4, "
    "num_attention_heads: 6, image_size: 112, patch_size: 16}"
)
SIGLIP_BIG = (
    "{model_type: siglip_vision_model, hidden_size: 768, intermediate_size: 3072, num_hidden_layers: 6, "
    "num_attention_heads: 12, image_size: 224, patch_size: 14}"
)
CLIP_MID = (
    "{model_type: clip_vision_model, hidden_size: 384, intermediate_size: 1536, num_hidden_layers: 4, "
    "num_attention_heads: 6, image_size: 112, patch_size: 14, hidden_act: quick_gelu}"
)

MODELS = {
    "toy": [],
    "llama-mid+siglip": [f"model.llm.config={LLAMA_MID}", f"model.vision.config={SIGLIP_MID}"],
    "llama-big+siglip": [f"model.llm.config={LLAMA_BIG}", f"model.vision.config={SIGLIP_BIG}"],
    "phi-mid+clip": [f"model.llm.config={PHI_MID}", f"model.vision.config={CLIP_MID}"],
    "stablelm-mid+siglip": [f"model.llm.config={STABLELM_MID}", f"model.vision.config={SIGLIP_MID}"],
}


def pct(est, real):
    return f"{(est / real - 1) * 100:+.1f}%"


# --------------------------------------------------------------------------- sections


def section_counts():
    print("\n## Parameter counts (meta device, embedded configs)\n")
    published = [
        ("microsoft/phi-2", "llm", 2_779_683_840, "2,779,683,840 (issue; HF model card: 2.78B)"),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "llm", 1_100_048_384, "1,100,048,384 (issue; HF: 1.1B)"),
        ("stabilityai/stablelm-2-1_6b", "llm", 1_644_417_024, "1,644,417,024 (HF model card table)"),
        ("stabilityai/stablelm-2-zephyr-1_6b", "llm", 1_644_417_024, "1,644,417,024 (same architecture)"),
        (
            "google/siglip-so400m-patch14-384",
            "vision",
            428_230_000,
            "428.23M image tower (open_clip model_profile.csv)",
        ),
        (
            "openai/clip-vit-large-patch14-336",
            "vision",
            304_290_000,
            "304.29M image tower incl. 1024x768 projection (open_clip model_profile.csv)",
        ),
    ]
    for hub, kind, _ref, text in published:
        data = json.loads(mem.arch_file(hub).read_text())
        n = mem.count_llm_parameters(data) if kind == "llm" else mem.count_vision_parameters(data)
        extra = ""
        if hub.startswith("openai/clip"):
            extra = f" + projection {1024 * 768:,} = {n + 1024 * 768:,}"
        print(f"{hub:38s} {n:>15,}{extra}   published: {text}")


def section_acts():
    print("\n## Activations: estimated vs saved for backward (saved_tensors_hooks), CPU\n")
    print(
        "| model | stage | precision | micro-batch x seq | no ckpt: measured | estimate | error "
        "| ckpt: measured | estimate | error |"
    )
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    cases = [
        ("toy", "pretrain", "fp32", 8, 256, []),
        ("toy", "share", "fp32", 8, 256, []),
        ("toy", "finetune", "fp32", 8, 256, []),
        ("toy", "share", "bf16", 8, 256, []),
        ("llama-mid+siglip", "pretrain", "fp32", 2, 320, []),
        ("llama-mid+siglip", "share", "fp32", 2, 320, []),
        ("llama-mid+siglip", "share", "bf16", 2, 320, []),
        ("llama-mid+siglip", "finetune", "bf16", 2, 320, ["stages.finetune.tune.llm=partial:-2"]),
        ("llama-big+siglip", "share", "bf16", 2, 768, []),
        ("phi-mid+clip", "share", "fp32", 2, 320, []),
        ("phi-mid+clip", "share", "bf16", 2, 320, []),
        ("stablelm-mid+siglip", "share", "fp32", 2, 320, []),
        ("stablelm-mid+siglip", "share", "bf16", 2, 320, []),
        ("llama-mid+siglip", "finetune", "bf16", 2, 320, ["stages.finetune.tune.llm=lora", "lora.r=16"]),
        ("llama-mid+siglip", "finetune", "bf16", 2, 320, ["stages.finetune.tune.llm=qlora", "lora.r=16"]),
        ("phi-mid+clip", "finetune", "bf16", 2, 320, ["stages.finetune.tune.llm=qlora", "lora.r=16"]),
        ("llama-mid+siglip", "share", "bf16", 2, 320, ["stages.share.tune.vision=lora", "lora.r=16"]),
        # the LM head + loss in chunks of 128 positions (the default 1024 is one chunk here)
        ("llama-mid+siglip", "share", "bf16", 2, 320, ["train.loss_chunk=128"]),
        ("llama-big+siglip", "finetune", "bf16", 2, 768, ["train.loss_chunk=128"]),
        (
            "llama-mid+siglip",
            "finetune",
            "bf16",
            2,
            320,
            ["stages.finetune.tune.llm=qlora", "lora.r=16", "train.loss_chunk=128"],
        ),
    ]
    worst = 0.0
    for name, stage, precision, B, S, extra in cases:
        cfg, _ = resolve("toy", "share", MODELS[name] + extra + [f"train.precision={precision}"])
        with tempfile.TemporaryDirectory() as tmp:
            model = measure.stage_model(cfg, stage, tmp, precision)
            batch = measure.make_batch(model, B, S)
            m0, m1 = measure.measure_saved(model, batch, precision)
        acts = mem.stage_activations(
            mem.build_meta(cfg.model),
            cfg,
            stage,
            seq_len=S,
            precision=precision,
            device="cpu",
            logit_positions=measure.logit_positions(batch),
        )
        e0, e1 = sum(acts.saved(B, False).values()), sum(acts.saved(B, True).values())
        worst = max(worst, abs(e0 / m0 - 1), abs(e1 / m1 - 1))
        tune = ", ".join(f"{c} {cfg.stages[stage].tune[c]}" for c in ("vision", "llm"))
        tune += f", loss chunk {cfg.train.loss_chunk}"
        print(
            f"| {name} | {stage} ({tune}) | {precision} | {B} x {S} | {m0 / MiB:.2f} MiB | {e0 / MiB:.2f} MiB | "
            f"{pct(e0, m0)} | {m1 / MiB:.2f} MiB | {e1 / MiB:.2f} MiB | {pct(e1, m1)} |"
        )
    print(f"\nlargest deviation: {worst:.1%}")


def section_peak():
    print("\n## Whole training step: planned total vs peak live tensor bytes, CPU\n")
    print(
        "| model | stage | precision | ckpt | micro-batch x seq | measured peak | planned total | error "
        "| planned peak at |"
    )
    print("| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |")
    cases = [
        ("toy", "share", "fp32", False, 8, 256, []),
        ("toy", "share", "fp32", True, 8, 256, []),
        ("toy", "pretrain", "fp32", False, 8, 256, []),
        ("llama-mid+siglip", "share", "fp32", False, 2, 320, []),
        ("llama-mid+siglip", "share", "fp32", True, 2, 320, []),
        ("llama-mid+siglip", "share", "bf16", False, 2, 320, []),
        ("llama-mid+siglip", "share", "bf16", True, 2, 320, []),
        ("llama-mid+siglip", "pretrain", "bf16", True, 2, 320, []),
        ("llama-big+siglip", "finetune", "bf16", True, 2, 768, []),
        ("llama-mid+siglip", "finetune", "bf16", True, 2, 320, ["stages.finetune.tune.llm=qlora", "lora.r=16"]),
        (
            "llama-mid+siglip",
            "finetune",
            "bf16",
            False,
            2,
            320,
            ["stages.finetune.tune.llm=lora", "lora.r=16", "train.optimizer=adamw_8bit"],
        ),
        ("llama-mid+siglip", "share", "bf16", False, 2, 320, ["train.loss_chunk=0"]),  # the loss at once
        ("llama-mid+siglip", "share", "bf16", False, 2, 320, ["train.loss_chunk=128"]),
        ("llama-big+siglip", "finetune", "bf16", True, 2, 768, ["train.loss_chunk=0"]),
        ("llama-big+siglip", "finetune", "bf16", True, 2, 768, ["train.loss_chunk=128"]),
    ]
    worst = 0.0
    for name, stage, precision, gc, B, S, extra in cases:
        cfg, _ = resolve(
            "toy",
            "share",
            MODELS[name] + extra + [f"train.precision={precision}", f"train.gradient_checkpointing={str(gc).lower()}"],
        )
        with tempfile.TemporaryDirectory() as tmp:
            peak, K = measure.measure_peak(cfg, stage, B, S, tmp)
        plan = mem.plan_run(cfg, seq_len=S, micro_batch=B, device="cpu", logit_positions=K)
        planned = next(s for s in plan.stages if s.name == stage)
        worst = max(worst, abs(planned.total / peak - 1))
        tune = ", ".join(f"{c} {cfg.stages[stage].tune[c]}" for c in ("vision", "llm"))
        tune += f", loss chunk {cfg.train.loss_chunk}"
        print(
            f"| {name} | {stage} ({tune}) | {precision} | {'on' if gc else 'off'} | {B} x {S} | "
            f"{peak / MiB:.1f} MiB | {planned.total / MiB:.1f} MiB | {pct(planned.total, peak)} | {planned.peak_at} |"
        )
    print(f"\nlargest deviation: {worst:.1%}")


def section_storage():
    print("\n## Weights, gradients, optimizer states: planned vs tensor bytes after one step, CPU\n")
    print("| model | stage | precision | optimizer | part | measured | planned |")
    print("| --- | --- | --- | --- | --- | ---: | ---: |")
    from tinylmm.train.optim import build_optimizer
    from tinylmm.trainability import param_groups

    cases = [
        ("toy", "pretrain", "fp32", "adamw", []),
        ("toy", "share", "bf16", "adamw", []),
        ("llama-mid+siglip", "finetune", "bf16", "adamw", ["stages.finetune.tune.llm=lora", "lora.r=16"]),
        ("llama-mid+siglip", "finetune", "bf16", "adamw_8bit", ["stages.finetune.tune.llm=qlora", "lora.r=16"]),
    ]
    for name, stage, precision, optim, extra in cases:
        cfg, _ = resolve(
            "toy", "share", MODELS[name] + extra + [f"train.precision={precision}", f"train.optimizer={optim}"]
        )
        with tempfile.TemporaryDirectory() as tmp:
            model = measure.stage_model(cfg, stage, tmp, precision)
            opt, _ = build_optimizer(param_groups(model, cfg.stages[stage]), optim, torch.device("cpu"))
            batch = measure.make_batch(model, 2, 160)

            def step(model=model, batch=batch, precision=precision):
                with measure.autocast(precision):
                    loss = model(**batch).loss_sum
                loss.backward()

            _, grads, states = measure.measure_storage(model, opt, step)
            quantized = [p for p in model.parameters() if getattr(p, "quant_state", None) is not None]
            weights = (
                sum(p.untyped_storage().nbytes() for p in model.parameters())
                + measure.quantized_bytes(model)
                - sum(p.untyped_storage().nbytes() for p in quantized)
            )
        plan = next(s for s in mem.plan_run(cfg, device="cpu").stages if s.name == stage)
        rows = plan.breakdown
        w = sum(v for k, v in rows.items() if k.startswith(("weights", "LoRA")))
        g = rows.get("gradients (fp32)", 0)
        o = sum(v for k, v in rows.items() if k.startswith("optimizer"))
        for part, m, e in (("weights", weights, w), ("gradients", grads, g), ("optimizer states", states, o)):
            print(
                f"| {name} | {stage} ({cfg.stages[stage].tune['llm']}) | {precision} | {optim} | {part} | "
                f"{m:,} | {e:,} ({pct(e, m) if m else 'n/a'}) |"
            )


def section_table():
    print("\n## TinyLLaVA presets on one 24 GB GPU at seq 2048 (tinylmm plan --tune qlora | lora)\n")
    print(
        "| preset | recipe | stage | vision / connector | micro-batch | --tune qlora: peak | largest micro-batch "
        "| --tune lora: peak | largest micro-batch |"
    )
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    positions = set()
    for preset in ("tinyllava-phi2-siglip-3.1b", "tinyllava-stablelm2-siglip-2.0b", "tinyllava-tinyllama-siglip-1.5b"):
        for recipe in ("base", "share"):
            plans = {
                tune: mem.plan_run(resolve(preset, recipe, tune=tune)[0], seq_len=2048) for tune in ("qlora", "lora")
            }
            for q, lo in zip(plans["qlora"].stages, plans["lora"].stages):
                cell = lambda s: f"{mem.fmt_bytes(s.total)}{'' if s.fits else ' (over)'} | {s.max_micro_batch}"  # noqa: E731
                llm = "" if q.tune["llm"] == "qlora" else f" (LLM {q.tune['llm']})"
                print(
                    f"| {preset} | {recipe} | {q.name}{llm} | {q.tune['vision']} / {q.tune['connector']} | "
                    f"{q.micro_batch} | {cell(q)} | {cell(lo)} |"
                )
                positions |= {q.logit_positions, lo.logit_positions}
    print(f"\nLM head and loss at {', '.join(map(str, sorted(positions)))} positions per sample (every text position)")


SECTIONS = {
    "counts": section_counts,
    "acts": section_acts,
    "peak": section_peak,
    "storage": section_storage,
    "table": section_table,
}

if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    names = sys.argv[1:] or list(SECTIONS)
    print(f"# bench/memory_check.py {' '.join(names)}  (torch {torch.__version__}, {os.cpu_count()} CPUs)")
    for n in names:
        t0 = time.time()
        SECTIONS[n]()
        print(f"\n({n}: {time.time() - t0:.0f} s)")
