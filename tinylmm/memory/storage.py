"""Weights, LoRA adapters, gradients and optimizer states of one stage, to the byte.

weights      trainable: fp32 master weights; frozen: the half dtype under bf16/fp16
             mixed precision (fp32 in an fp32 run); qlora: the LLM's linear layers
             as bitsandbytes 4-bit (or int8) blocks, every other LLM parameter cast to
             fp32 by peft's prepare_model_for_kbit_training ("k-bit prep copies")
LoRA         r * (in + out) per adapted linear layer, fp32 while it trains
gradients    fp32, trainable parameters only (kept whole: gradient accumulation)
optimizer    AdamW: two fp32 states per trainable parameter; *_8bit: one byte each
             plus block scales; paged_*: the same bytes, in pageable unified memory
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from tinylmm.memory.arch import MetaModel
from tinylmm.memory.components import HALF, ComponentState, component_state
from tinylmm.schema import COMPONENTS, RunConfig

# bitsandbytes
NF4_BLOCK = 64  # weights per absmax (Linear4bit)
NESTED_BLOCK = 256  # absmax values per second-level block under double quantization
OPT8_BLOCK = 256  # 8-bit optimizer states: values per fp32 absmax
OPT8_MIN_SIZE = 4096  # smaller tensors keep 32-bit optimizer states (min_8bit_size)
OPT8_MAPS = 2 * 256 * 4  # the two 8-bit quantization maps, shared by every tensor


def kbit_bytes(numel: int, rows: int, bits: int, double_quant: bool) -> float:
    """One bitsandbytes-quantized weight: packed values + quantization state."""
    if bits == 8:  # LLM.int8: int8 values + one fp32 scale per output row
        return numel + 4 * rows
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)
    code = 16 * 4  # the NF4/FP4 code book
    if not double_quant:
        return packed + 4 * blocks + code
    # absmax as 8-bit + an fp32 absmax per 256 blocks + the 8-bit code (256 fp32) + offset
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 256 * 4 + 4 + code


def optimizer_bytes(tensors: list[int], optimizer: str, device: str) -> tuple[str, float]:
    """(row label, bytes) of the optimizer states for trainable tensors of these sizes."""
    if optimizer.endswith("8bit"):
        n = sum(2 * t + 8 * math.ceil(t / OPT8_BLOCK) if t >= OPT8_MIN_SIZE else 8 * t for t in tensors)
        label = "optimizer: AdamW 8-bit"
    else:
        # torch keeps a `step` scalar per tensor, on the CPU even when the states are on a GPU
        n = sum(8 * t for t in tensors) + (4 * len(tensors) if device == "cpu" else 0)
        label = "optimizer: AdamW fp32"
    return label + (" (paged)" if optimizer.startswith("paged") else ""), n


@dataclass
class Storage:
    rows: dict  # label -> bytes, all components
    by_component: dict  # component -> {label -> bytes}
    trainable: dict  # component -> trainable parameter count (LoRA included)

    def step_scratch(self, optimizer: str, device: str) -> float:
        """Temporaries of optimizer.step(). The run takes torch's fused AdamW on CUDA and
        the CPU (tinylmm.train.optim), which updates in place: no temporaries (measured on
        the CPU: 0 bytes, where foreach makes one fp32 copy of the group and the for-loop
        two of the largest tensor). Elsewhere `foreach` over a parameter group (the sqrt of
        the second moments: one fp32 copy of the group). bitsandbytes' kernels update in place."""
        if optimizer != "adamw" or not any(self.trainable.values()) or device in FUSED_ADAMW_DEVICES:
            return 0.0
        return 4.0 * max(self.trainable.values())


# where tinylmm.train.optim takes torch's fused AdamW (FUSED_DEVICES there; a test keeps them equal)
FUSED_ADAMW_DEVICES = ("cuda", "cpu", "xpu")

_ORDER = ("weights", "LoRA", "gradients", "optimizer")


def stage_storage(
    meta: MetaModel,
    cfg: RunConfig,
    stage: str,
    precision: str,
    states: dict[str, ComponentState] | None = None,
    device: str = "cuda",
) -> Storage:
    half = HALF.get(precision)  # None: an fp32 run
    hname = precision if half else "fp32"
    by_comp: dict[str, dict] = {}
    trainable = {}
    for comp in COMPONENTS:
        rows: dict[str, float] = {}

        def add(label, n, rows=rows):
            rows[label] = rows.get(label, 0) + n

        state = (states or {}).get(comp) or component_state(meta, cfg, stage, comp)
        module = meta.component(comp)
        rows_of = {id(m.weight): m.out_features for m in module.modules() if isinstance(m, nn.Linear)}
        tensors = []  # sizes of the trainable tensors
        for p in module.parameters():
            n = p.numel()
            if id(p) in state.quantized:
                kind = "int8" if cfg.quant.bits == 8 else cfg.quant.quant_type.upper()
                add(f"weights: {kind} + scales", kbit_bytes(n, rows_of[id(p)], cfg.quant.bits, cfg.quant.double_quant))
            elif id(p) in state.trainable:
                add("weights: fp32 (trainable)", 4 * n)
                tensors.append(n)
            elif state.kbit_prepared:
                add("weights: fp32 (k-bit prep copies)", 4 * n)
            else:
                add(f"weights: {hname} (frozen)", (half or 4) * n)
            if id(p) in state.copies:  # peft's modules_to_save: a full copy next to the frozen original
                if state.lora_trainable:
                    add("weights: fp32 (modules_to_save)", 4 * n)
                    tensors.append(n)
                else:
                    add(f"weights: {hname} (frozen)", (half or 4) * n)
        n_lora = sum(cfg.lora.r * (i + o) for i, o in state.lora.values())
        if n_lora and state.lora_trainable:
            add("LoRA adapters (fp32)", 4 * n_lora)
            tensors += [cfg.lora.r * n for i, o in state.lora.values() for n in (i, o)]
        elif n_lora:
            add(f"LoRA adapters ({hname}, frozen)", (half or 4) * n_lora)
        if tensors:
            add("gradients (fp32)", 4 * sum(tensors))
            add(*optimizer_bytes(tensors, cfg.train.optimizer, device))
        trainable[comp] = sum(tensors)
        by_comp[comp] = rows
    merged: dict[str, float] = {}
    for rows in by_comp.values():
        for k, v in rows.items():
            merged[k] = merged.get(k, 0) + v
    for k in merged:
        if k.startswith("optimizer: AdamW 8-bit"):
            merged[k] += OPT8_MAPS
    merged = dict(sorted(merged.items(), key=lambda kv: next(i for i, o in enumerate(_ORDER) if kv[0].startswith(o))))
    return Storage(merged, by_comp, trainable)
