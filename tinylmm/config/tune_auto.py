"""`--tune auto`: per stage, the least-degrading way to train the LLM that fits the device.

Stage by stage, in the recipe's order, the LLM's mode is the first of

    the recipe's own (full or partial:N)  ->  lora  ->  qlora

under which the memory plan (tinylmm.memory.plan_run, on the meta device) fits the device's
memory. Within a mode the recipe's micro-batch is kept when it fits; else the largest
smaller divisor of the stage's batch_size that does, so the global batch, and with it the
optimisation, is unchanged (more gradient accumulation). accelerate's
`find_executable_batch_size` finds a batch size by running and "decreasing the batch size
in half after each failed run"; here the planner answers before anything is loaded, and the
batch the recipe asks for stays the batch each optimizer step sees.

A stage's plan depends on the stages before it (adapters persist; after a qlora stage the
base is 4-bit: tinylmm.trainability.structures), so each stage is planned with the
choices made before it, and offered only the modes those allow and that the later stages
auto cannot change (a mode set by an override, a recipe's qlora) can follow. What the user
set with an override (a stage's `tune.llm`, its `micro_batch_size`) is kept. When nothing
fits, the stage keeps the last candidate (qlora, micro-batch 1) and the loop's plan warns
as it always has. Devices the planner does not model (the CPU, mps, xpu) keep the recipe's
modes. The choice is one line, announced before training and written at the top of the
run's config.yaml; the values it changed name `--tune auto` as their layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tinylmm import trainability
from tinylmm.config.resolve import retune_stage, trains_llm_weights
from tinylmm.errors import ConfigError
from tinylmm.memory import plan_run
from tinylmm.memory.device import Device
from tinylmm.schema import RunConfig
from tinylmm.sizes import fmt_bytes

SOURCE = "--tune auto"
# The header comment of config.yaml: tinylmm.config.saving writes source keys that start
# with "#" as comment lines at the top.
HEADER_KEY = f"# {SOURCE}"


@dataclass
class StageChoice:
    stage: str
    llm: str  # the LLM's mode chosen (or kept)
    micro_batch: int
    total: int  # planned peak, bytes
    fits: bool

    def describe(self, budget: int) -> str:
        over = "" if self.fits else ", over: nothing tried fits"
        return (
            f"{self.stage}: {_mode_text(self.llm)} micro-batch {self.micro_batch} "
            f"(plans {fmt_bytes(self.total)} of {fmt_bytes(budget)}{over})"
        )


@dataclass
class TuneChoice:
    device: Device
    stages: list[StageChoice] = field(default_factory=list)
    kept: str = ""  # why the recipe's modes were kept ("" when the planner chose)

    def summary(self) -> str:
        """The config.yaml comment, after `# --tune auto: `."""
        if self.kept:
            return f"the recipe's modes kept: {self.kept}"
        return "; ".join(s.describe(self.device.memory) for s in self.stages)

    def announcement(self) -> str:
        where = f"{self.device.name}, {fmt_bytes(self.device.memory)}" if not self.kept else self.device.name
        return f"{SOURCE} ({where}): {self.summary()}"


def _mode_text(llm: str) -> str:
    return "LLM frozen" if llm == "frozen" else llm


def candidates(cfg: RunConfig, sources: dict[str, str], stage: str, before: str) -> list[str]:
    """The LLM modes to try for `stage`, least degrading first, given the structure the
    stages before it left (`before`: plain | lora | qlora)."""
    mode = cfg.stages[stage].tune["llm"]
    if sources.get(f"stages.{stage}.tune.llm") == "override" or mode in ("frozen", "qlora"):
        return [mode]
    ladder = [mode, "lora", "qlora"] if trains_llm_weights(mode) else ["lora", "qlora"]
    if before == "qlora":  # a 4-bit base from then on
        return ["qlora"]
    if before == "lora":  # qlora after lora is refused (tinylmm.trainability.structures)
        return [m for m in ladder if m != "qlora"]
    return ladder


def micro_batches(cfg: RunConfig, sources: dict[str, str], stage: str) -> list[int]:
    """The recipe's micro-batch, then the smaller divisors of the global batch, largest first."""
    st = cfg.stages[stage]
    if sources.get(f"stages.{stage}.micro_batch_size") == "override":
        return [st.micro_batch_size]
    return [st.micro_batch_size] + [b for b in range(st.micro_batch_size - 1, 0, -1) if st.batch_size % b == 0]


def _plan_stage(cfg: RunConfig, stage: str, budget: int):
    """The plan of `stage` as `cfg` has it; the stages after it do not change it."""
    names = list(cfg.stages)
    upto = dataclasses.replace(cfg, stages={n: cfg.stages[n] for n in names[: names.index(stage) + 1]})
    return plan_run(upto, budget_bytes=budget, device="cuda").stages[-1]


def choose_tune(
    cfg: RunConfig, sources: dict[str, str], device: Device
) -> tuple[RunConfig, dict[str, str], TuneChoice]:
    """`cfg` with each stage's LLM mode and micro-batch chosen for `device`, its sources
    (the changed values name `--tune auto`; `HEADER_KEY` holds the config.yaml comment) and
    the choice."""
    choice = TuneChoice(device)
    if device.kind != "cuda":
        choice.kept = f"no CUDA device ({device.name}); the memory planner models CUDA GPUs only"
    else:
        try:
            cfg, sources = _choose(cfg, sources, device.memory, choice)
        except ConfigError as e:  # an architecture the planner does not know: as the loop does
            choice.stages, choice.kept = [], f"memory plan unavailable: {str(e).splitlines()[0]}"
    sources = {**sources, HEADER_KEY: choice.summary()}
    return cfg, sources, choice


def _choose(cfg: RunConfig, sources: dict[str, str], budget: int, choice: TuneChoice):
    original = cfg
    for stage in cfg.stages:
        before = _structure_before(cfg, stage)
        picked = None
        modes = candidates(original, sources, stage, before)
        for mode in [m for m in modes if _later_stages_can_follow(cfg, sources, stage, m)] or modes:
            for b in micro_batches(original, sources, stage):
                trial, trial_sources = retune_stage(cfg, sources, stage, llm=mode, micro_batch=b, source=SOURCE)
                plan = _plan_stage(trial, stage, budget)
                picked = (trial, trial_sources, StageChoice(stage, mode, b, plan.total, plan.fits))
                if plan.fits:
                    break
            if picked[2].fits:
                break
        cfg, sources, made = picked  # nothing fits: the last candidate, and the loop warns
        choice.stages.append(made)
    return cfg, sources


def _later_stages_can_follow(cfg: RunConfig, sources: dict[str, str], stage: str, mode: str) -> bool:
    """Whether the later stages auto cannot change (a mode set by an override, a recipe's
    qlora) may follow `stage` trained in `mode`: a 4-bit base admits only qlora after it,
    and qlora may not follow lora (tinylmm.trainability.structures)."""
    names = list(cfg.stages)
    k = names.index(stage)
    fixed = [n for n in names[k + 1 :] if len(candidates(cfg, sources, n, "plain")) == 1]
    stages = {n: cfg.stages[n] for n in names[:k] + [stage] + fixed}
    stages[stage] = dataclasses.replace(cfg.stages[stage], tune={**cfg.stages[stage].tune, "llm": mode})
    try:
        trainability.structures(dataclasses.replace(cfg, stages=stages), "llm")
    except ConfigError:
        return False
    return True


def _structure_before(cfg: RunConfig, stage: str) -> str:
    """The LLM's structure the stages before `stage` leave (those are chosen already)."""
    names = list(cfg.stages)
    i = names.index(stage)
    if i == 0:
        return "plain"
    done = dataclasses.replace(cfg, stages={n: cfg.stages[n] for n in names[:i]})
    return trainability.structures(done, "llm")[names[i - 1]]
