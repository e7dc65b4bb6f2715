"""A stage's model: the structure its `tune` modes ask for (LoRA adapters attached, the LLM
quantized, adapters merged back), then which parameters train (tinylmm.trainability)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tinylmm import trainability
from tinylmm.models import adapters
from tinylmm.schema import RunConfig
from tinylmm.train import engines

log = logging.getLogger(__name__)


def prepare_stage(
    model,
    cfg: RunConfig,
    name: str,
    run_dir: Path,
    *,
    device="cpu",
    attn_implementation="sdpa",
    half_dtype: torch.dtype | None = None,
) -> tuple[trainability.Counts, list[str]]:
    """Give the model the structure stage `name` needs, then its trainability plan.

    Structure changes follow `trainability.structures`: attach adapters (and quantize the
    LLM for qlora, from a base written to `<run>/<stage>/llm-base/`), keep them through
    lora/qlora/frozen stages, merge them before a full/partial stage. Returns the plan
    summary and one line per change made, for the log. With `half_dtype` (bf16/fp16 mixed
    precision), frozen weights are stored in it: they only feed autocast matmuls."""
    notes = []
    llm_state = trainability.structures(cfg, "llm")[name]
    vision_state = trainability.structures(cfg, "vision")[name]
    has_llm_lora = adapters.is_peft(model.llm)
    if llm_state == "plain" and has_llm_lora:
        adapters.merge_llm_lora(model)
        notes.append("llm: LoRA adapters merged into the base")
    elif llm_state in ("lora", "qlora") and not has_llm_lora:
        base_dir = run_dir / name / "llm-base"
        if llm_state == "qlora":
            sharded = engines.requested() == "fsdp"  # the 4-bit weights stored as FSDP can shard them
            adapters.quantize_llm(
                model, base_dir, cfg.quant, device=device, attn_implementation=attn_implementation, sharded=sharded
            )
            kernels = (
                "CUDA kernels"
                if torch.device(device).type == "cuda"
                else "bitsandbytes' CPU fallback kernels (no GPU: slower than CUDA)"
            )
            notes.append(
                f"llm: reloaded from {base_dir} in {cfg.quant.bits}-bit"
                + (
                    f" {cfg.quant.quant_type}, double quant {cfg.quant.double_quant}, "
                    f"compute {cfg.quant.compute_dtype}, stored as "
                    + str(adapters.storage_dtype(cfg.quant, sharded=sharded)).removeprefix("torch.")
                    if cfg.quant.bits == 4
                    else " (LLM.int8)"
                )
                + f"; {kernels}"
            )
        adapters.attach_llm_lora(model, cfg.lora, base_dir)
        notes.append(
            f"llm: LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} dropout={cfg.lora.dropout} on "
            f"{', '.join(sorted(model.llm.peft_config['default'].target_modules))}"
            + (f"; trained in full: {', '.join(cfg.lora.modules_to_save)}" if cfg.lora.modules_to_save else "")
        )
    if vision_state == "plain" and adapters.has_vision_lora(model):
        adapters.merge_vision_lora(model)
        notes.append("vision: LoRA adapters merged into the tower")
    elif vision_state == "lora" and not adapters.has_vision_lora(model):
        adapters.attach_vision_lora(model, cfg.lora)
        notes.append(f"vision: LoRA r={cfg.lora.r} alpha={cfg.lora.alpha}")
    # New adapters are created on the CPU; a k-bit LLM is loaded on its device already and
    # is not moved again (bitsandbytes' packed weights and their quant states move apart).
    for part in (model.vision, model.connector) if adapters.is_quantized(model.llm) else (model,):
        part.to(device)
    summary = trainability.apply(model, cfg.stages[name], f"stages.{name}")
    if half_dtype is not None:
        store_frozen_in(model, half_dtype)
    return summary, notes


def store_frozen_in(model, dtype: torch.dtype) -> None:
    """Frozen float weights in `dtype`, trainable ones in fp32 (the optimizer's master copy).
    A quantized LLM keeps what k-bit preparation chose (fp32 norms, embeddings, head)."""
    skip = set(map(id, model.llm.parameters())) if adapters.is_quantized(model.llm) else set()
    for p in model.parameters():
        if id(p) in skip or not p.is_floating_point():
            continue
        want = torch.float32 if p.requires_grad else dtype
        if p.dtype != want:
            p.data = p.data.to(want)
