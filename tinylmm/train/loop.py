"""The staged training loop, on accelerate (single process, DDP, `accelerate launch`).

Each stage: trainability -> optimizer groups -> token-weighted steps with gradient
accumulation, clipping, warmup + cosine -> step-N checkpoints -> final/. The next stage
starts from the model as the previous one left it. `resume=True` continues from the last
complete checkpoint with the same data order, optimizer and schedule state.

Faults (README "Reliability"): a non-finite step updates nothing and `train.max_bad_steps`
of them in a row stop the run; SIGINT/SIGTERM save a checkpoint at the next step boundary
(tinylmm.train.interrupts); a checkpoint write that fails stops the run with the earlier
checkpoints intact (tinylmm.train.checkpoint.write_checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinylmm import trainability
from tinylmm.config import dump_resolved, load_resolved
from tinylmm.data.instructize import InstructOptions, instructize_file
from tinylmm.data.llava import LlavaDataset, SkipReport
from tinylmm.data.mixture import MixtureDataset, Part
from tinylmm.data.packing import collate_packed_items, packing_note, token_counts
from tinylmm.data.shapes import write_shapes_dataset
from tinylmm.errors import ConfigError, DivergenceError, RunInterrupted
from tinylmm.eval import BENCHMARKS
from tinylmm.memory import fmt_bytes, plan_run
from tinylmm.models.assemble import build_model
from tinylmm.models.checkpoint import restore_parts
from tinylmm.models.loading import quiet_libraries
from tinylmm.models.packing_check import check_packing
from tinylmm.schema import RunConfig
from tinylmm.train import checkpoint as ckpt
from tinylmm.train import engines, process_rng, trainer_state
from tinylmm.train.bad_images import BadImages, SkipLog, SlotSampler, allowed
from tinylmm.train.grouping import ModalityLengthGrouping
from tinylmm.train.interrupts import StopRequests
from tinylmm.train.optim import build_optimizer
from tinylmm.train.progress import Reporter
from tinylmm.train.runtime import (
    configure_head_loss,
    enable_checkpointing,
    has_accelerator,
    resolve_attention,
    resolve_precision,
)
from tinylmm.train.schedule import StageSampler, fit_micro_batches, lr_lambda, stage_steps, step_indices
from tinylmm.train.stages import prepare_stage

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    final: Path
    skip_reports: list[SkipReport] = field(default_factory=list)
    eval: dict | None = None
    losses: dict[str, list[float]] = field(default_factory=dict)
    is_main: bool = True  # False on the other processes of a multi-process run


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.preset}-{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"


def _stage_data(cfg: RunConfig, name: str, processor, run_dir: Path, accel, report):
    stage = cfg.stages[name]
    template = processor.get_template(stage.template or cfg.model.template)  # checked against the tokenizer
    checks = dict(
        verify_images=cfg.data.verify_images,
        allow_outside_paths=cfg.data.allow_outside_paths,
        cache=cfg.data.cache,
        num_proc=cfg.data.num_proc or os.cpu_count() or 1,  # the main process tokenizes (a cache miss) alone
    )
    workers = max(1, (os.cpu_count() or 1) // accel.num_processes)  # every process checks: share the CPUs

    def dataset(source, images):
        # the main process tokenizes a cache miss; the others wait, then map what it wrote
        with accel.main_process_first():
            return LlavaDataset(source, images, processor, template, stage.max_len, **checks, workers=workers)

    if stage.data.shapes is not None:
        s = cfg.shapes
        with accel.main_process_first():
            paths = write_shapes_dataset(
                run_dir / "data" / "shapes",
                seed=s.seed,
                n_caption=s.n_caption,
                n_instruct=s.n_instruct,
                n_eval=s.n_eval,
                n_pope=s.n_pope,
                image_size=s.image_size or processor.image_processor.size,
            )
        return dataset(paths[stage.data.shapes], paths["images"])

    def read(json_path, images, instructize, tag):
        if instructize is not None:  # converted once per run, beside the shapes data
            images = images or Path(json_path).parent
            converted = run_dir / "data" / f"{tag}-instructized.json"
            with accel.main_process_first():
                if accel.is_main_process:
                    _, done = instructize_file(json_path, converted, InstructOptions.from_dict(instructize, tag))
                    report.note(f"{json_path}: instructized, {done.summary()}: {converted}")
            json_path = converted
        return dataset(json_path, images)

    data = stage.data
    if data.datasets is None:
        return read(data.json, data.images, data.instructize, f"stages.{name}.data")
    datasets, parts = [], []
    for i, d in enumerate(data.datasets):
        ds = read(d.json, d.images, d.instructize, f"stages.{name}.data.datasets[{i}]")
        datasets.append(ds)
        parts.append(Part(d.json, d.task or "-", len(ds), d.weight, d.max_samples))
    mix = MixtureDataset(datasets, parts, data.balance or "per-dataset", data.cap, cfg.train.seed)
    report.note(f"stages.{name}: {mix.summary()}")
    if accel.is_main_process:
        (run_dir / "data").mkdir(parents=True, exist_ok=True)
        (run_dir / "data" / f"{name}-mixture.json").write_text(json.dumps(mix.resolved(), indent=2) + "\n")
    return mix


def train(
    cfg: RunConfig | None = None,
    sources: dict | None = None,
    *,
    resume_dir: str | Path | None = None,
    console=None,
    evaluate: bool = True,
) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if resume_dir is not None:
        run_dir = Path(resume_dir)
        if not (run_dir / "config.yaml").exists():
            raise FileNotFoundError(f"cannot resume '{run_dir}': no config.yaml there")
        cfg = load_resolved(run_dir / "config.yaml")
    else:
        assert cfg is not None
        run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(cfg)

    quiet_libraries()
    precision, precision_note = resolve_precision(cfg.train.precision)
    # cpu=True when there is no accelerator: under `accelerate launch` (torchrun) this is
    # what makes accelerate form a gloo process group instead of N independent runs.
    _forget_previous_accelerator()
    engines.refuse_where_it_cannot_run(cuda=torch.cuda.is_available(), accelerator=has_accelerator())
    accel = Accelerator(mixed_precision=precision, cpu=not has_accelerator())
    report = Reporter(console, accel.is_main_process, run_dir / "metrics.jsonl")
    attn, attn_note = resolve_attention(cfg.train.attn_implementation, accel.device)
    report.note(f"precision: {precision_note}; attention: {attn_note}; processes: {accel.num_processes}")
    if untested := engines.not_run_yet():
        report.warn(untested)
    # The global batch stays global: the micro-batch gives way to the number of processes.
    sources = dict(sources or {})
    for name, old, new in fit_micro_batches(cfg, accel.num_processes):
        world, batch = accel.num_processes, cfg.stages[name].batch_size
        why = f"{old} -> {new}, so that {new} x {world} processes divide batch_size {batch}"
        report.note(f"stages.{name}: micro_batch_size {why}")
        sources[f"stages.{name}.micro_batch_size"] = why

    if resume_dir is None:
        if accel.is_main_process:
            if (run_dir / "config.yaml").exists():
                raise FileExistsError(
                    f"'{run_dir}' already holds a run; use --resume {run_dir} or another --output-dir"
                )
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_resolved(cfg, sources, run_dir / "config.yaml")
        accel.wait_for_everyone()

    if accel.is_main_process:  # before the model is built: building it may be what runs out
        _warn_if_a_stage_will_not_fit(cfg, accel.device, report)
    set_seed(cfg.train.seed)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # A part no stage trains in full is only ever a frozen base: load it in the half dtype
    # right away (half the memory, and half the llm-base/ a qlora stage writes).
    only_frozen = {c: trainability.only_frozen(cfg, c) for c in ("llm", "vision")}
    model, processor = build_model(
        cfg.model,
        attn_implementation=attn,
        llm_dtype=half if only_frozen["llm"] else None,
        vision_dtype=half if only_frozen["vision"] else None,
    )
    trainability.check_partial_layers(model, cfg)
    runs = model.llm.config._attn_implementation
    if runs != attn:
        report.warn(f"the LLM ({type(model.llm).__name__}) has no {attn} attention: it runs {runs} attention")
    model.to(accel.device)

    stages = list(cfg.stages.items())
    data, loaded = {}, {}
    for name, stage in stages:  # stages reading the same data share one tokenized copy
        key = (repr(stage.data), stage.template or cfg.model.template, stage.max_len)
        if key not in loaded:
            loaded[key] = _stage_data(cfg, name, processor, run_dir, accel, report)
            report.note(loaded[key].report.summary())
        data[name] = loaded[key]
    result = RunResult(run_dir, run_dir / "final", [d.report for d in loaded.values()], is_main=accel.is_main_process)
    SkipLog(run_dir, accel.is_main_process, fresh=resume_dir is None).start(result.skip_reports)
    with StopRequests(announce=accel.is_main_process) as stop:
        _train_stages(accel, model, processor, cfg, stages, data, run_dir, resume_dir, attn, half, report, result, stop)
    if stop.signum:  # a signal during the last stage: its final/ is written; no evaluation
        if accel.is_main_process:
            ckpt.link_final(run_dir, stages[-1][0])
        raise RunInterrupted(
            f"every stage is trained ({run_dir / 'final'}); the evaluation was skipped: "
            f"tinylmm eval {run_dir / 'final'}",
            stop.exit_code,
        )

    if accel.is_main_process:
        ckpt.link_final(run_dir, stages[-1][0])
        for d in loaded.values():
            if d.report.skipped:
                report.note(d.report.summary() + "; first: " + "; ".join(f"{i} ({r})" for i, r in d.report.skipped[:3]))
        # drawn before evaluating: a failed evaluation still leaves the training curves
        plotted = [report.plot_loss(run_dir / "plots" / "loss.png")]
        if evaluate and cfg.eval.bench:
            model.eval()
            for bench in cfg.eval.bench:  # the first one's summary is the run's result
                benchmark = BENCHMARKS.get(bench, "eval.bench")
                summary = benchmark.evaluate(
                    model,
                    processor,
                    benchmark.data_for(run_dir / "final", processor),
                    out=run_dir / "eval" / f"{bench}.json",
                    batch_size=cfg.eval.batch_size,
                    max_new_tokens=cfg.eval.max_new_tokens,
                )
                report.eval_table(summary)
                report.record_eval(summary)
                plotted.append(report.plot_eval(summary, run_dir / "plots" / f"eval-{bench}.png"))
                result.eval = result.eval or summary
        if any(plotted):
            report.note("plots: " + ", ".join(str(p) for p in plotted if p is not None))
    accel.wait_for_everyone()
    accel.end_training()
    report.close()
    return result


def _train_stages(accel, model, processor, cfg, stages, data, run_dir, resume_dir, attn, half, report, result, stop):
    """Every stage in order, each from where the previous one left the model."""
    for index, (name, _) in enumerate(stages):
        stage_dir = run_dir / name
        final_dir = stage_dir / "final"
        # The stage's structure (adapters, quantized LLM) first: a checkpoint loads into it.
        with accel.main_process_first():  # the main process writes a base the others read
            summary, notes = prepare_stage(
                model, cfg, name, run_dir, device=accel.device, attn_implementation=attn, half_dtype=half
            )
        if cfg.train.gradient_checkpointing:
            enable_checkpointing(model)
        notes.append(configure_head_loss(model, cfg.train, accel.device))
        for line in notes:
            report.note(f"stage {name}: {line}")
        if resume_dir is not None and (final_dir / "tinylmm.json").exists():
            restore_parts(model, final_dir)
            report.note(f"stage {name}: done earlier, continuing from {final_dir}")
            continue
        start_step, state = 0, None
        last = ckpt.latest_step(stage_dir) if resume_dir is not None else None
        if last is not None:
            restore_parts(model, last)
            state = trainer_state.load(last)
            start_step = state["step"]
            report.note(f"stage {name}: resuming from {last} (step {start_step})")
        if resume_dir is not None:
            report.truncate_metrics(name, start_step)
        result.losses[name] = _train_stage(
            accel, model, processor, cfg, index, name, data[name], stage_dir, start_step, state, report, summary, stop
        )
        ckpt.write_checkpoint(accel, final_dir, lambda d: model.save(d, processor), run_dir)
        accel.wait_for_everyone()
        if index < len(stages) - 1 and stop.requested(accel):
            raise RunInterrupted(
                f"{stop.name}: stopped after stage '{name}' (its final/ is written); resume with: "
                f"{ckpt.resume_command(run_dir)}",
                stop.exit_code,
            )


def device_memory(device: torch.device) -> int:
    """What one process may use: the GPU's memory, or the machine's RAM on a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _warn_if_a_stage_will_not_fit(cfg: RunConfig, device: torch.device, report) -> None:
    """The memory planner, before anything is trained: a stage that will not fit is
    announced with what to change, instead of failing hours in with an out-of-memory."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    budget = device_memory(device)
    try:
        plan = plan_run(cfg, budget_bytes=budget, device=kind)
    except ConfigError as e:  # an architecture the planner does not know: train anyway
        report.note(f"memory plan unavailable: {e}")
        return
    peaks = ", ".join(f"{s.name} {fmt_bytes(s.total)}" for s in plan.stages)
    report.note(f"memory plan ({kind}, budget {fmt_bytes(budget)}): {peaks}")
    for stage in plan.stages:
        if not stage.fits:
            report.warn(stage.warning())


def _forget_previous_accelerator() -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another
    precision; a Python user may well train twice in one process (fp32, then bf16). The
    process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    if hasattr(AcceleratorState, "_reset_state"):
        AcceleratorState._reset_state(reset_partial_state=False)


def _train_stage(
    accel, model, processor, cfg, index, name, dataset, stage_dir, start_step, state, report, summary, stop
):
    stage = cfg.stages[name]
    where = f"stages.{name}"
    steps = stage_steps(stage, len(dataset), accel.num_processes, where)
    report.note(
        f"stage {index + 1}/{len(cfg.stages)} '{name}': {steps.total_steps} steps of {steps.global_batch} "
        f"({steps.accumulation} x {steps.micro_batch} x {steps.world_size} proc); trainable: {summary.describe()}"
    )
    groups = trainability.param_groups(model, stage)
    if not groups:
        raise ValueError(f"{where}: nothing to train (every component is frozen)")
    optimizer, optimizer_note = build_optimizer(groups, cfg.train.optimizer, accel.device)
    report.note(f"stage {name}: optimizer {optimizer_note}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(stage.scheduler, steps.warmup_steps, steps.total_steps)
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    wrapped, optimizer = accel.prepare(model, optimizer)
    wrapped.train()

    seed = cfg.train.seed * 1000 + index
    grouping = ModalityLengthGrouping(dataset.modality_lengths()) if cfg.train.group_by_modality_length else None
    if cfg.train.packing:  # the stage's LLM as prepared (adapters, 4-bit base) must confine attention
        check_packing(model.llm)
        report.note(f"stage {name}: {packing_note(model.llm.config._attn_implementation)}")
    collate = collate_packed_items if cfg.train.packing else dataset.collate
    limit = allowed(cfg.data.max_bad_images, len(dataset))
    log = SkipLog(stage_dir.parent, accel.is_main_process)
    bad = BadImages(accel, log, name, dataset, seed, limit, start_step, collate)
    rank = accel.process_index
    loader = torch.utils.data.DataLoader(
        bad.replacing,  # a sample whose image fails is replaced (tinylmm.train.bad_images)
        batch_sampler=SlotSampler(StageSampler(steps, seed, rank, start_step, grouping), steps, rank, start_step),
        collate_fn=bad.replacing.collate,
        num_workers=cfg.train.num_workers,
    )
    trainable = [p for g in groups for p in g["params"]]
    batches = iter(loader)  # draws a seed from the global RNG: restore the RNG after it
    if state is not None:
        process_rng.restore(state["rng"], accel.process_index)  # dropout (e.g. LoRA's) continues where it stopped
    losses = []
    bad_in_a_row = bad_steps = 0
    report.start_stage(name, steps.total_steps, start_step)
    for step in range(start_step, steps.total_steps):
        t0 = time.perf_counter()
        # Every process knows the whole step's samples, so the loss is the mean over all
        # supervised tokens of the global batch, whatever the accumulation or world size.
        global_tokens = sum(dataset.num_supervised(i) for i in step_indices(steps, step, seed, grouping))
        loss_sum = torch.zeros((), device=accel.device)
        counts = torch.zeros(2, dtype=torch.long)  # useful tokens, positions (padding included)
        for micro in range(steps.accumulation):
            batch, failures = next(batches)
            bad.note(failures)
            batch = {k: v.to(accel.device) for k, v in batch.items()}
            counts += torch.tensor(token_counts(batch))
            sync = micro == steps.accumulation - 1
            with contextlib.nullcontext() if sync else accel.no_sync(wrapped):
                micro_loss = wrapped(**batch).loss_sum  # the logits are not kept past this line
                # DDP averages gradients over processes: scale back to a sum over the batch.
                accel.backward(micro_loss * accel.num_processes / global_tokens)
            loss_sum += micro_loss.detach().float()
            del micro_loss
        global_tokens = bad.settle(global_tokens, trainable)  # the replacements' tokens, if any
        grad_norm = float(accel.clip_grad_norm_(trainable, stage.max_grad_norm))
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        loss = (accel.reduce(loss_sum, reduction="sum") / global_tokens).item()
        done = step + 1
        # The non-finite guard: a step whose loss or gradient norm is not finite updates
        # nothing (the same on every process: both are reduced over the processes).
        if math.isfinite(loss) and math.isfinite(grad_norm):
            optimizer.step()
            bad_in_a_row = 0
        else:
            bad_in_a_row, bad_steps = bad_in_a_row + 1, bad_steps + 1
            report.note(
                f"stage {name}: step {done}: loss {loss}, gradient norm {grad_norm}: not finite, "
                f"no update ({bad_in_a_row} in a row)"
            )
        scheduler.step()  # the schedule follows the data position, updated or not
        optimizer.zero_grad(set_to_none=True)
        tokens, positions = accel.reduce(counts.to(accel.device), reduction="sum").tolist()
        losses.append(loss)
        report.step(name, index, done, loss, lr, grad_norm, tokens, time.perf_counter() - t0, positions)
        if bad_in_a_row >= cfg.train.max_bad_steps:
            raise DivergenceError(
                f"stages.{name}: {bad_in_a_row} steps in a row to step {done} had a non-finite loss or "
                f"gradient norm (train.max_bad_steps={cfg.train.max_bad_steps}); the run stopped before "
                f"writing this stage's final/ (its step checkpoints so far are intact). Lower "
                f"stages.{name}.lr (now {stage.lr:g}) and train again"
            )
        stopping = stop.requested(accel)  # SIGINT/SIGTERM: a checkpoint here, then stop
        due = stopping or (stage.save_every and done % stage.save_every == 0)
        if bad.over or (done < steps.total_steps and due):
            _save_step(accel, model, processor, optimizer, scheduler, stage_dir, done)
        if bad.over:  # more images failed than data.max_bad_images: stop with the checkpoint just written
            raise bad.stop_error(ckpt.step_dir(stage_dir, done), stage_dir.parent, cfg.data.max_bad_images)
        if stopping and done < steps.total_steps:
            raise RunInterrupted(
                f"{stop.name}: stopped at stage '{name}' step {done}/{steps.total_steps}, checkpoint "
                f"{ckpt.step_dir(stage_dir, done)}; resume with: {ckpt.resume_command(stage_dir.parent)}",
                stop.exit_code,
            )
    report.end_stage()
    if bad_steps:
        report.note(f"stage {name}: {bad_steps} step(s) with a non-finite loss or gradient norm made no update")
    broken = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if broken:  # never a final/ of non-finite weights
        raise DivergenceError(f"stages.{name}: non-finite weights after training ({', '.join(broken[:3])} ...)")
    accel.free_memory()  # drop the DDP wrapper: the next stage wraps its own trainable set
    return losses


def _save_step(accel, model, processor, optimizer, scheduler, stage_dir, step):
    accel.wait_for_everyone()
    rng = process_rng.gather(accel)  # collective: every process's RNG state, before the main one writes

    def write(d):  # on the main process
        model.save(d, processor)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng,
        }
        trainer_state.save(state, d)

    ckpt.write_checkpoint(accel, ckpt.step_dir(stage_dir, step), write, stage_dir.parent)
    accel.wait_for_everyone()
