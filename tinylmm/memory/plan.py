"""The plan of a run: each stage's peak memory, its breakdown, the verdict against a
budget, the largest micro-batch that fits, and what to try when a stage does not fit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tinylmm.errors import ConfigError
from tinylmm.memory.activations import Activations, stage_activations
from tinylmm.memory.arch import build_meta
from tinylmm.memory.components import component_state
from tinylmm.memory.storage import Storage, stage_storage
from tinylmm.schema import COMPONENTS, RunConfig
from tinylmm.sizes import GiB, MiB, fmt_bytes

DEFAULT_BUDGET = 24 * GiB

# CUDA context of a torch process with lazy module loading (CUDA >= 11.7): ~300-400 MB
# measured by the PyTorch maintainers (pytorch/pytorch#107667, #109888), plus cuBLAS /
# cuDNN workspaces: 512 MiB. The caching allocator holds more than it hands out (block
# rounding, fragmentation between differently sized activations): 5% of the tensors.
CUDA_CONTEXT_BYTES = 512 * MiB
ALLOCATOR_SLACK = 0.05


def resolve_plan_precision(requested: str, device: str) -> str:
    """GPU: auto = bf16 (every 24 GB card since Ampere has it). CPU: auto = fp32 unless bf16
    is asked for explicitly (the toy pins fp32; bf16 autocast is slower on small CPUs)."""
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device '{device}' is not one of cuda, cpu")
    if requested == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if requested == "fp16" and device == "cpu":
        raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    return requested


@dataclass
class StagePlan:
    name: str
    total: int  # bytes at the planned peak
    fits: bool
    max_micro_batch: int  # the largest micro-batch dividing the global batch that fits; 0: none
    breakdown: dict[str, int]  # label -> bytes, summing to `total`
    budget: int
    micro_batch: int
    seq_len: int
    logit_positions: int  # per sample: where the LM head and the loss run
    batch_size: int  # global
    gradient_checkpointing: bool
    precision: str
    device: str
    tune: dict[str, str]
    trainable: dict[str, int]  # component -> trainable parameters
    alternative: dict  # the same stage with gradient checkpointing the other way
    peak_at: str = ""  # the moment of the peak (end of forward, start of backward ...)
    notes: list[str] = field(default_factory=list)

    def warning(self) -> str:
        """One sentence: the stage, its planned peak, the budget and what to try."""
        if self.fits:
            return (
                f"stage '{self.name}' is planned to peak at {fmt_bytes(self.total)} on {self.device}, within the "
                f"{fmt_bytes(self.budget)} budget."
            )
        tries = []
        llm = self.tune.get("llm", "")
        if llm == "full" or llm.startswith("partial"):
            tries.append("--tune qlora (or lora)")
        if not self.gradient_checkpointing:
            alt = self.alternative.get("total")
            tries.append("train.gradient_checkpointing=true" + (f" (plans {fmt_bytes(alt)})" if alt else ""))
        if self.max_micro_batch:
            tries.append(f"stages.{self.name}.micro_batch_size={self.max_micro_batch} (the largest that fits)")
        elif self.micro_batch > 1:
            tries.append(f"a smaller micro-batch (stages.{self.name}.micro_batch_size; even 1 does not fit as is)")
        if self.seq_len > 512:
            tries.append(f"a shorter stages.{self.name}.max_len")
        if not tries:
            tries = ["a larger GPU"]
        what = f"{', '.join(tries[:-1])} or {tries[-1]}" if len(tries) > 1 else tries[0]
        return (
            f"stage '{self.name}' is planned to peak at {fmt_bytes(self.total)} on {self.device} "
            f"(micro-batch {self.micro_batch} x {self.seq_len} tokens), over the {fmt_bytes(self.budget)} budget: "
            f"try {what}."
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tune_text(tune: dict) -> str:
    return ", ".join(f"{c} {tune[c]}" for c in COMPONENTS)


@dataclass
class RunPlan:
    preset: str
    recipe: str
    device: str
    budget: int
    stages: list[StagePlan]
    notes: list[str] = field(default_factory=list)
    tune_auto: str = ""  # what `--tune auto` chose for this device, when it chose the config planned

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def to_dict(self) -> dict:
        return {
            "preset": self.preset,
            "recipe": self.recipe,
            "device": self.device,
            "budget": self.budget,
            "fits": self.fits,
            "notes": self.notes,
            "tune_auto": self.tune_auto,
            "stages": [s.to_dict() for s in self.stages],
        }

    def rich_tables(self):
        """One table per stage: the breakdown with gradient checkpointing as planned and the
        other way, the totals, the verdicts, the largest micro-batches, the peak moments."""
        from rich.table import Table

        tables = []
        for s in self.stages:
            alt = s.alternative
            t = Table(
                title=f"stage {s.name}: {_tune_text(s.tune)}; {s.precision}; micro-batch {s.micro_batch} x "
                f"{s.seq_len} tokens, LM head at {s.logit_positions}",
                title_justify="left",
            )
            t.add_column("memory")
            t.add_column(f"checkpointing {'on' if s.gradient_checkpointing else 'off'}", justify="right")
            t.add_column(
                f"checkpointing {'on' if alt['gradient_checkpointing'] else 'off'}", justify="right", style="dim"
            )
            alt_rows = alt["breakdown"]
            for label in list(s.breakdown) + [k for k in alt_rows if k not in s.breakdown]:
                t.add_row(
                    label,
                    fmt_bytes(s.breakdown[label]) if label in s.breakdown else "",
                    fmt_bytes(alt_rows[label]) if label in alt_rows else "",
                )
            verdict = "[green]fits[/green]" if s.fits else "[bold red]over budget[/bold red]"
            t.add_row(
                "[bold]total[/bold]", f"[bold]{fmt_bytes(s.total)}[/bold]", fmt_bytes(alt["total"]), end_section=True
            )
            t.add_row(f"vs budget {fmt_bytes(s.budget)}", verdict, "fits" if alt["fits"] else "over budget")
            t.add_row("largest micro-batch that fits", str(s.max_micro_batch), str(alt["max_micro_batch"]))
            t.add_row("peak at the", s.peak_at, alt["peak_at"])
            tables.append(t)
        return tables


def _totals(
    storage: Storage, acts: Activations, batch: int, gc: bool, device: str, optimizer: str
) -> tuple[str, dict[str, float]]:
    """(the peak moment, the rows at it, which sum to the planned total)."""
    at, act_rows = acts.rows(batch, gc)
    rows = {**storage.rows, **act_rows}
    step = {**storage.rows, "optimizer step scratch": storage.step_scratch(optimizer, device)}
    if sum(step.values()) > sum(rows.values()):
        at, rows = "optimizer step", step
    if device == "cuda":
        rows["CUDA context + allocator slack"] = CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * sum(rows.values())
    return at, rows


def _max_micro_batch(storage, acts, gc, device, budget, global_batch, optimizer) -> int:
    """The largest divisor of the global batch that fits; 0 when even 1 does not."""

    def fits(b):
        return sum(_totals(storage, acts, b, gc, device, optimizer)[1].values()) <= budget

    return max((b for b in range(1, global_batch + 1) if global_batch % b == 0 and fits(b)), default=0)


def plan_run(
    cfg: RunConfig,
    *,
    seq_len: int | None = None,
    micro_batch: int | None = None,
    budget_bytes: int = DEFAULT_BUDGET,
    device: str = "cuda",
    logit_positions: int | None = None,
) -> RunPlan:
    """Plan every stage of `cfg`: the peak memory of one training process, its breakdown,
    the verdict against `budget_bytes` and the largest micro-batch that fits.
    seq_len / micro_batch default to each stage's max_len / micro_batch_size;
    logit_positions (per sample: where the LM head and the loss run) to the most a batch
    can have, seq_len minus the visual tokens of one image."""
    meta = build_meta(cfg.model)
    precision = resolve_plan_precision(cfg.train.precision, device)
    gc = cfg.train.gradient_checkpointing
    opt = cfg.train.optimizer
    plans = []
    for name, st in cfg.stages.items():
        s = seq_len or st.max_len
        b = micro_batch or st.micro_batch_size
        states = {c: component_state(meta, cfg, name, c) for c in COMPONENTS}
        storage = stage_storage(meta, cfg, name, precision, states, device)
        acts = stage_activations(
            meta,
            cfg,
            name,
            seq_len=s,
            precision=precision,
            device=device,
            logit_positions=logit_positions,
            states=states,
        )
        at, now = _totals(storage, acts, b, gc, device, opt)
        alt_at, alt = _totals(storage, acts, b, not gc, device, opt)
        now = {k: int(round(v)) for k, v in now.items()}
        alt = {k: int(round(v)) for k, v in alt.items()}
        total, alt_total = sum(now.values()), sum(alt.values())
        notes = list(acts.notes)
        if not any(storage.trainable.values()):
            notes.append("nothing trains in this stage")
        if any("(paged)" in k for k in now):
            notes.append("paged optimizer states can be evicted to CPU RAM under pressure (slower steps)")
        plans.append(
            StagePlan(
                name=name,
                total=total,
                fits=total <= budget_bytes,
                max_micro_batch=_max_micro_batch(storage, acts, gc, device, budget_bytes, st.batch_size, opt),
                breakdown=now,
                budget=budget_bytes,
                micro_batch=b,
                seq_len=s,
                logit_positions=acts.logit_positions,
                batch_size=st.batch_size,
                gradient_checkpointing=gc,
                precision=precision,
                device=device,
                tune={c: st.tune[c] for c in COMPONENTS},
                trainable=dict(storage.trainable),
                alternative={
                    "gradient_checkpointing": not gc,
                    "total": alt_total,
                    "fits": alt_total <= budget_bytes,
                    "max_micro_batch": _max_micro_batch(
                        storage, acts, not gc, device, budget_bytes, st.batch_size, opt
                    ),
                    "breakdown": alt,
                    "peak_at": alt_at,
                },
                peak_at=at,
                notes=notes,
            )
        )
    M = meta.num_image_tokens
    notes = list(dict.fromkeys(meta.notes))
    notes.append(f"{M} visual tokens per image; one image per sample; every sample padded to the stage's length")
    if logit_positions is None:
        notes.append(
            f"LM head and loss at every text position (the tokens minus the {M} visual ones): the most "
            f"a batch can supervise; real batches supervise fewer (--logit-positions)"
        )
    if device == "cuda":
        notes.append(
            f"framework overhead: {fmt_bytes(CUDA_CONTEXT_BYTES)} CUDA context + {ALLOCATOR_SLACK:.0%} allocator slack"
        )
    return RunPlan(cfg.preset, cfg.recipe, device, budget_bytes, plans, notes)
