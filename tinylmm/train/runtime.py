"""Picking precision and attention for the hardware at hand, and saying which was taken."""

from __future__ import annotations

import importlib.util
import logging

import torch

from tinylmm.models.head_loss import choose_kernel

log = logging.getLogger(__name__)


def has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str) -> tuple[str, str]:
    """-> (accelerate mixed_precision, a sentence for the log). Weights stay fp32; autocast."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            return (
                ("bf16", "bf16 autocast (GPU)")
                if torch.cuda.is_bf16_supported()
                else ("fp16", "fp16 autocast (GPU without bf16)")
            )
        if cpu_has_bf16():
            return "bf16", "bf16 autocast (CPU with native bf16)"
        return "no", "fp32 (this CPU has no native bf16; fallback)"
    if requested == "fp32":
        return "no", "fp32 (requested)"
    if requested == "fp16" and not cuda:
        raise ValueError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    return requested, f"{requested} autocast (requested)"


def resolve_attention(requested: str, device: torch.device) -> tuple[str, str]:
    """flash_attention_2 when installed and on GPU, else sdpa; the fallback is announced."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    on_gpu = device.type == "cuda"
    if requested in ("auto", "flash_attention_2"):
        if has_flash and on_gpu:
            return "flash_attention_2", "flash_attention_2"
        why = "flash-attn is not installed" if not has_flash else "no GPU"
        if requested == "flash_attention_2":
            log.warning("flash_attention_2 requested but %s: falling back to sdpa", why)
            return "sdpa", f"sdpa (flash_attention_2 requested, but {why}: fallback)"
        return "sdpa", f"sdpa ({why} for flash_attention_2)"
    return requested, requested


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of the LLM's and the tower's layers."""
    for part in (model.llm, model.vision.model):
        if hasattr(part, "set_grad_checkpointing"):  # an open_clip tower: its switch (non-reentrant)
            part.set_grad_checkpointing(True)
            continue
        if getattr(part, "is_activation_checkpointing", None) or (
            not hasattr(part, "is_activation_checkpointing") and getattr(part, "is_gradient_checkpointing", False)
        ):
            continue
        if hasattr(part, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            part.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def configure_head_loss(model, train, device: torch.device) -> str:
    """Set how the model runs its LM head + loss (train.loss_chunk, train.loss_kernel),
    for the head it has now (a stage's adapters may wrap it). -> a sentence for the log."""
    kernel, note = choose_kernel(train.loss_kernel, model.llm.get_output_embeddings(), device)
    if train.loss_kernel == "liger" and kernel != "liger":
        log.warning(note)  # asked for and not available: say so loudly
    model.loss_chunk, model.loss_kernel = train.loss_chunk, kernel
    if kernel == "torch":
        note += f", {train.loss_chunk} positions per chunk" if train.loss_chunk > 0 else ", unchunked (loss_chunk 0)"
    return note
