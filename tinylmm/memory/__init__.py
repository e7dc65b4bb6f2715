"""The memory planner: will each stage of a run fit on one GPU, and with what micro-batch?

`plan_run(cfg)` needs no weights. It builds the architectures on the `meta` device from
configs embedded in tinylmm/assets/arch/ or shipped with open_clip (arch.py), decides for each stage which
parameters train and how each is stored (components.py), counts weights, adapters,
gradients and optimizer states to the byte (storage.py), and counts the activations
tensor by tensor as the modules' forward code saves them for backward (tracer.py,
layers.py), at the worst moment of a micro-batch (activations.py). plan.py adds the CUDA
context and allocator slack, weighs the total against the budget, finds the largest
micro-batch that fits and words the warning. tinylmm/train/measure.py holds the planner to
the truth on the CPU (tests/test_memory.py, bench/memory_check.py).

Assumptions, stated once: one process (no DDP gradient buckets); one image per sample;
every sample padded to the planned length (a padding mask is materialised, the worst
case); sdpa attention (flash-attention-2 saves a little less); the LM head and the loss at
`logit_positions` positions per sample, by default every text position (seq_len minus
the visual tokens of one image), the most a batch can supervise: TinyLMM.forward runs the
head only where some sample's next token is supervised, which real data makes fewer.
"""

from tinylmm.memory.activations import Activations, default_logit_positions, stage_activations
from tinylmm.memory.arch import (
    MetaModel,
    arch_config,
    arch_file,
    build_meta,
    count_llm_parameters,
    count_vision_parameters,
    embedded_archs,
)
from tinylmm.memory.components import ComponentState, component_state
from tinylmm.memory.device import Device, detect_device
from tinylmm.memory.plan import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_BYTES,
    DEFAULT_BUDGET,
    RunPlan,
    StagePlan,
    plan_run,
    resolve_plan_precision,
)
from tinylmm.memory.storage import Storage, stage_storage
from tinylmm.sizes import GiB, MiB, fmt_bytes, parse_size

__all__ = [
    "ALLOCATOR_SLACK",
    "CUDA_CONTEXT_BYTES",
    "DEFAULT_BUDGET",
    "GiB",
    "MiB",
    "Activations",
    "ComponentState",
    "Device",
    "MetaModel",
    "RunPlan",
    "StagePlan",
    "Storage",
    "arch_config",
    "arch_file",
    "build_meta",
    "component_state",
    "count_llm_parameters",
    "count_vision_parameters",
    "default_logit_positions",
    "detect_device",
    "embedded_archs",
    "fmt_bytes",
    "parse_size",
    "plan_run",
    "resolve_plan_precision",
    "stage_activations",
    "stage_storage",
]
