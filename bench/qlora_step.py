"""QLoRA share-stage steps of a real-size TinyLLaVA architecture, on CPU, random weights.

    python bench/qlora_step.py                                    # TinyLlama-1.1B + SigLIP-so400m
    python bench/qlora_step.py --preset tinyllava-phi2-siglip-3.1b   # opt-in: ~10 GB, minutes

The preset's LLM and vision tower are built from the embedded architecture configs with
random weights (nothing to download), through the training loop itself: a one-stage recipe
holding the share recipe's `share` stage under `--tune qlora` (LLM in 4-bit NF4 with LoRA
r128, vision tower from layer 12, connector), two optimizer steps of one shapes caption
each: the optimizer states are created during the first step, so only the second has
them alive through its forward and backward, as every later step of a run. It prints the
peak RSS of setting up (building, writing llm-base/, reloading in 4-bit) and of the
training steps (the kernel's high-water mark is reset in between), next to the planner's
estimate for the same settings on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_rss_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tinyllava-tinyllama-siglip-1.5b")
    ap.add_argument("--precision", default="bf16", help="bf16 (this CPU has native bf16) or fp32")
    ap.add_argument("--max-len", type=int, default=1024)
    args = ap.parse_args()

    from tinylmm.catalog import zoo
    from tinylmm.catalog.recipes import load_recipe
    from tinylmm.config import resolve
    from tinylmm.memory import arch_config, fmt_bytes, plan_run
    from tinylmm.train import loop

    preset = zoo.get(args.preset).model_spec()
    share = load_recipe("share").stages["share"]
    share.update(data={"shapes": "caption"}, batch_size=1, micro_batch_size=1, max_steps=2, max_len=args.max_len)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "share-step.yaml"
        recipe.write_text("# one share-stage step\n" + yaml.safe_dump({"stages": {"share": share}}))
        overrides = [
            f"model.llm.config={json.dumps(arch_config(preset.llm, 'llm'))}",
            "model.llm.name_or_path=null",
            "model.llm.tokenizer=builtin:toy",  # the real tokenizer cannot be downloaded; ids < vocab
            f"model.vision.config={json.dumps(arch_config(preset.vision, 'vision'))}",
            "model.vision.name_or_path=null",
            f"train.precision={args.precision}",
            "shapes.n_caption=8",
            "shapes.n_instruct=8",
            "shapes.n_eval=4",
            "eval.bench=[]",
        ]
        cfg, sources = resolve(args.preset, str(recipe), overrides, tune="qlora", output_dir=f"{tmp}/run")

        steps = {}
        original = loop._train_stage

        def timed_stage(accel, model, processor, cfg, index, name, dataset, *a, **kw):
            from tinylmm.train.schedule import stage_steps, step_indices

            # the set-up is done when the stage starts; note what the one step will train on
            plan = stage_steps(cfg.stages[name], len(dataset), 1, name)
            seed = cfg.train.seed * 1000 + index
            steps["supervised"] = max(dataset.num_supervised(i) for s in (0, 1) for i in step_indices(plan, s, seed))
            steps["setup_peak"] = rss_peak_bytes()
            reset_rss_peak()
            t0 = time.perf_counter()
            out = original(accel, model, processor, cfg, index, name, dataset, *a, **kw)
            steps["step_s"] = time.perf_counter() - t0
            steps["step_peak"] = rss_peak_bytes()
            return out

        loop._train_stage = timed_stage
        t0 = time.perf_counter()
        result = loop.train(cfg, sources, evaluate=False)
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        tokens = max(r["tokens"] for r in records if "tokens" in r)
    # The planner for the same settings, at the length of the sample that was trained on.
    planned = plan_run(cfg, seq_len=tokens, logit_positions=steps["supervised"], device="cpu").stages[0]

    print(
        f"preset {args.preset}, precision {args.precision}, share stage, --tune qlora, micro-batch 1, "
        f"{tokens} tokens, {steps['supervised']} supervised"
    )
    print(
        f"losses {[round(x, 4) for x in result.losses['share']]}; wall {wall:.1f} s, "
        f"of which the two steps {steps['step_s']:.1f} s"
    )
    print(f"peak RSS, set-up (build, write llm-base/, reload 4-bit): {fmt_bytes(steps['setup_peak'])}")
    print(f"peak RSS, training steps:                                 {fmt_bytes(steps['step_peak'])}")
    print(
        f"planner (device cpu), peak of the step:                   {fmt_bytes(planned.total)} "
        f"({(planned.total / steps['step_peak'] - 1) * 100:+.1f}% vs measured)"
    )
    for label, value in planned.breakdown.items():
        print(f"    {label:<40} {fmt_bytes(value)}")


if __name__ == "__main__":
    main()
