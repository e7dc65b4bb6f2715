"""What `--tune auto` chooses for every zoo preset's recipe on one CUDA GPU, and the peak
the memory planner gives each stage (planned on the meta device: no GPU, no weights).

    python bench/tune_auto_table.py                      # share, 24 GiB
    python bench/tune_auto_table.py --recipe base --budget 16GB

Prints the markdown table of bench/README.md ("`--tune auto`"): per stage the LLM's mode,
the micro-batch (the recipe's in brackets where auto lowered it) and the planned peak; last,
the highest peak of the recipe as written (what `--tune` unset planned before auto).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinylmm.catalog import zoo  # noqa: E402
from tinylmm.config import resolve  # noqa: E402
from tinylmm.config.tune_auto import choose_tune  # noqa: E402
from tinylmm.memory import Device, parse_size, plan_run  # noqa: E402
from tinylmm.sizes import GiB  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="share")
    ap.add_argument("--budget", default="24GB")
    args = ap.parse_args()
    budget = parse_size(args.budget)
    device = Device("cuda", budget, f"{args.budget} CUDA GPU")
    t0 = time.perf_counter()
    names = [n for n in zoo.names() if n != "toy"]
    stages = list(resolve(names[0], args.recipe)[0].stages)
    print(f"| preset | {' | '.join(stages)} | highest peak | the recipe as written |")
    print("| --- |" + " --- |" * len(stages) + " ---: | ---: |")
    for name in names:
        recipe, sources = resolve(name, args.recipe)
        cfg, _, choice = choose_tune(recipe, sources, device)  # what api.resolve_config(tune="auto") does
        cells = []
        for s in choice.stages:
            st = cfg.stages[s.stage]
            assert (st.tune["llm"], st.micro_batch_size) == (s.llm, s.micro_batch)
            was = recipe.stages[s.stage].micro_batch_size
            mb = f"{s.micro_batch}" + (f" (of {was})" if s.micro_batch != was else "")
            cells.append(f"{s.llm}, {mb}: {s.total / GiB:.2f} GiB" + ("" if s.fits else " **over**"))
        peak = max(s.total for s in choice.stages)
        written = max(s.total for s in plan_run(recipe, budget_bytes=budget).stages)
        print(f"| {name} | {' | '.join(cells)} | {peak / GiB:.2f} GiB | {written / GiB:.2f} GiB |")
    print(f"\n{len(names)} presets in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
