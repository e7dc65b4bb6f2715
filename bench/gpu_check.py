"""The prepared GPU check: real-size random-weight models, a few training steps of every
stage of a recipe under `--tune qlora` and `--tune lora`, and what the GPU says about
memory and speed beside what the planner says.

    python bench/gpu_check.py --out gpu_check.json            # one CUDA GPU, ~8 min, no downloads
    python bench/gpu_check.py --tiny --out /tmp/tiny.json      # the same path on the CPU, tiny models

Models: TinyLlama-1.1B, StableLM-2-1.6B and Phi-2, each with SigLIP-so400m-patch14-384,
built with random weights from the embedded configs (tinylmm/assets/arch/), so nothing is
downloaded. Each stage of the recipe (default `share`: pretrain, share, finetune) runs at
the recipe's micro-batch (the preset's stage_defaults applied) at `--seq` tokens, every
text token supervised, through the training loop's own pieces: prepare_stage (adapters,
the 4-bit base), the chunked LM head + loss, gradient checkpointing, AdamW.

Per stage it records torch.cuda.max_memory_allocated and max_memory_reserved over the
timed steps, the planner's total for the same stage and micro-batch, tokens per second,
and what ran: the attention implementation, whether bitsandbytes' 4-bit layers ran on
CUDA, and the LM head + loss kernel (chunked torch or Liger). It writes a JSON file and
prints a table. `--tiny` swaps in small configs of the same classes and runs on the CPU
(memory figures are then the planner's alone): tests/test_gpu_check.py runs it so.
"""

from __future__ import annotations

import argparse
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
from tinylmm.models.assemble import build_model  # noqa: E402
from tinylmm.train import measure  # noqa: E402
from tinylmm.train.optim import build_optimizer  # noqa: E402
from tinylmm.train.runtime import configure_head_loss, enable_checkpointing, resolve_attention  # noqa: E402
from tinylmm.train.stages import prepare_stage  # noqa: E402
from tinylmm.trainability import param_groups  # noqa: E402

PRESETS = {
    "tinyllama": ("tinyllava-tinyllama-siglip-1.5b", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
    "stablelm2": ("tinyllava-stablelm2-siglip-2.0b", "stabilityai/stablelm-2-1_6b"),
    "phi2": ("tinyllava-phi2-siglip-3.1b", "microsoft/phi-2"),
}
TOWER = "google/siglip-so400m-patch14-384"
# --tiny: the same classes, small (CPU-sized)
TINY_LLM = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "stablelm": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "phi": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=56)
GiB = 2**30


def overrides(llm_hub: str, tiny: bool) -> list[str]:
    llm = json.loads(mem.arch_file(llm_hub).read_text())
    tower = json.loads(mem.arch_file(TOWER).read_text())
    if tiny:
        llm.update(TINY_LLM[llm["model_type"]], vocab_size=512)
        llm.pop("num_key_value_heads", None)
        tower.update(TINY_TOWER, patch_size=14)
    return [
        "model.llm.name_or_path=null",
        "model.llm.tokenizer=builtin:toy",  # the batches are synthetic ids: any tokenizer with <image>
        "model.template=llama",  # the toy tokenizer's template
        f"model.llm.config={json.dumps(llm)}",  # JSON is YAML: an override's value
        "model.vision.name_or_path=null",
        f"model.vision.config={json.dumps(tower)}",
    ]


def kernels_used(model, device: torch.device) -> dict:
    import importlib.util

    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    four_bit = [m for m in llm.modules() if type(m).__name__ == "Linear4bit"]
    return {
        "attention": getattr(llm.config, "_attn_implementation", None),
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
        "bnb_4bit_layers": len(four_bit),
        "bnb_4bit_on_cuda": bool(four_bit) and four_bit[0].weight.device.type == "cuda",
        "loss_kernel": model.loss_kernel,
        "loss_chunk": model.loss_chunk,
    }


def run_stage(cfg, stage: str, micro: int, seq: int, steps: int, device: torch.device, run_dir: Path) -> dict:
    cuda = device.type == "cuda"
    precision = "bf16" if (cuda and torch.cuda.is_bf16_supported()) or not cuda else "fp16"
    attn, attn_note = resolve_attention(cfg.train.attn_implementation, device)
    with device:  # real-size weights straight onto the GPU
        model, _ = build_model(cfg.model, attn_implementation=attn)
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    prepare_stage(model, cfg, stage, run_dir, device=device, attn_implementation=attn, half_dtype=half)
    model.to(device)
    enable_checkpointing(model)
    loss_note = configure_head_loss(model, cfg.train, device)
    groups = param_groups(model, cfg.stages[stage])
    opt, opt_note = build_optimizer(groups, cfg.train.optimizer, device)
    batch = {k: v.to(device) for k, v in measure.make_batch(model, micro, seq).items()}
    model.train()

    def step():
        with torch.autocast(device.type, dtype=half):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # the optimizer states, the allocator's first blocks
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    plan = mem.plan_run(cfg, seq_len=seq, micro_batch=micro, device="cuda" if cuda else "cpu")
    planned = next(s for s in plan.stages if s.name == stage)
    row = {
        "stage": stage,
        "tune": dict(cfg.stages[stage].tune),
        "micro_batch": micro,
        "seq_len": seq,
        "steps": steps,
        "loss_last": losses[-1],
        "tokens_per_s": micro * seq * steps / wall,
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
        "max_memory_reserved_gib": torch.cuda.max_memory_reserved() / GiB if cuda else None,
        "planned_gib": planned.total / GiB,
        "planned_peak_at": planned.peak_at,
        "kernels": kernels_used(model, device),
        "notes": [attn_note, loss_note, f"optimizer {opt_note}"],
    }
    return row


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument("--recipe", default="share")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--tunes", nargs="+", default=["qlora", "lora"], choices=["qlora", "lora"])
    ap.add_argument("--seq", type=int, default=None, help="tokens per sample (default 2048; --tiny 96)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per stage, after one warm-up step")
    ap.add_argument("--tiny", action="store_true", help="small models of the same classes, on the CPU")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type != "cuda" and not args.tiny:
        ap.error("no CUDA GPU here: run with --tiny for the CPU check")
    seq = args.seq or (96 if args.tiny else 2048)
    rows = []
    for key in args.presets:
        preset, llm_hub = PRESETS[key]
        for tune in args.tunes:
            extra = overrides(llm_hub, args.tiny)
            cfg, _ = resolve(preset, args.recipe, extra, tune=tune)
            if args.tiny and "share" in cfg.stages:  # the tiny tower keeps 3 layers: partial:12 is past its end
                cfg, _ = resolve(preset, args.recipe, [*extra, "stages.share.tune.vision=partial:50%"], tune=tune)
            for stage in cfg.stages:
                micro = 2 if args.tiny else cfg.stages[stage].micro_batch_size
                with tempfile.TemporaryDirectory() as tmp:
                    row = run_stage(cfg, stage, micro, seq, args.steps, device, Path(tmp))
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the stage's model is gone: give its blocks back
                rows.append({"preset": preset, "llm": llm_hub, "tower": TOWER, "tune_flag": tune, **row})
                print(_line(rows[-1]), flush=True)
    out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tiny": args.tiny,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\n{len(rows)} stages -> {args.out}\n")
    print(table(rows))
    return rows


def _gib(x):
    return "-" if x is None else f"{x:.2f}"


def _line(r: dict) -> str:
    return (
        f"{r['preset']} --tune {r['tune_flag']} {r['stage']}: micro {r['micro_batch']} x {r['seq_len']}, "
        f"allocated {_gib(r['max_memory_allocated_gib'])} GiB, reserved {_gib(r['max_memory_reserved_gib'])} GiB, "
        f"planned {r['planned_gib']:.2f} GiB, {r['tokens_per_s']:.0f} tokens/s"
    )


def table(rows: list[dict]) -> str:
    out = [
        "| preset | --tune | stage | micro-batch x seq | max allocated | max reserved | planned | tokens/s "
        "| attention | 4-bit on CUDA | LM head + loss |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in rows:
        k = r["kernels"]
        out.append(
            f"| {r['preset']} | {r['tune_flag']} | {r['stage']} | {r['micro_batch']} x {r['seq_len']} | "
            f"{_gib(r['max_memory_allocated_gib'])} GiB | {_gib(r['max_memory_reserved_gib'])} GiB | "
            f"{r['planned_gib']:.2f} GiB | {r['tokens_per_s']:.0f} | {k['attention']} | "
            f"{'yes' if k['bnb_4bit_on_cuda'] else 'no' if k['bnb_4bit_layers'] else 'n/a'} | "
            f"{k['loss_kernel']} (chunk {k['loss_chunk']}) |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
