"""Which scale-out engine `accelerate launch` asked for, and refusing one that cannot run here.

`accelerate launch --config_file F` tells the processes it starts what F's
`distributed_type` is through the environment (accelerate/utils/launch.py:
`ACCELERATE_USE_DEEPSPEED=true` with `ACCELERATE_DEEPSPEED_ZERO_STAGE`, or
`ACCELERATE_USE_FSDP=true` with `FSDP_VERSION`). accelerate 1.15 honours those only on
an accelerator: its `AcceleratorState` turns DeepSpeed on only `if ... and not cpu`, and
FSDP only for the MULTI_GPU/NPU/XPU/... distributed types, never MULTI_CPU. tinylmm
asks for `Accelerator(cpu=True)` on a machine without one, so there a DeepSpeed or FSDP
file would silently train as plain DDP over gloo (measured: the same losses as ddp.yaml).
The run stops instead, before any model is built, saying which file to use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from tinylmm.errors import ConfigError


def _on(env: Mapping[str, str], key: str) -> bool:
    return env.get(key, "false").strip().lower() in ("1", "true", "yes")


def requested(env: Mapping[str, str] = os.environ) -> str | None:
    """'deepspeed', 'fsdp' or None (DDP, or a single process), from accelerate launch's environment."""
    if _on(env, "ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _on(env, "ACCELERATE_USE_FSDP"):
        return "fsdp"
    return None


def describe(env: Mapping[str, str] = os.environ) -> str:
    """The accelerate config's engine in its own words, e.g. `distributed_type: DEEPSPEED, zero_stage: 3`."""
    engine = requested(env)
    if engine == "deepspeed":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        offload = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
        return (
            "distributed_type: DEEPSPEED"
            + (f", zero_stage: {stage}" if stage else "")
            + (f", offload_optimizer_device: {offload}" if offload not in ("", "none") else "")
        )
    if engine == "fsdp":
        return f"distributed_type: FSDP, fsdp_version: {env.get('FSDP_VERSION', '1')}"
    return "DDP"


def refuse_where_it_cannot_run(*, cuda: bool, accelerator: bool, env: Mapping[str, str] = os.environ) -> None:
    """A ConfigError when the launch asked for DeepSpeed without CUDA or FSDP without an
    accelerator: accelerate would run plain DDP under the engine's name."""
    engine = requested(env)
    use = "tinylmm launch --config_file ddp.yaml train ... (tinylmm cp ddp . writes it)"
    if engine == "deepspeed" and not cuda:
        raise ConfigError(
            f"the accelerate config given to accelerate launch asks for DeepSpeed ({describe(env)}), and DeepSpeed "
            f"needs CUDA GPUs: this machine has none. On CPU processes use the ddp config: {use}"
        )
    if engine == "fsdp" and not accelerator:
        raise ConfigError(
            f"the accelerate config given to accelerate launch asks for FSDP ({describe(env)}), and accelerate runs "
            f"FSDP only on GPUs: on this machine's CPU processes it would train as plain DDP. Use the ddp config: {use}"
        )


def not_run_yet(env: Mapping[str, str] = os.environ) -> str | None:
    """What to tell a run under DeepSpeed or FSDP (on GPUs): tinylmm's tests have not trained under it."""
    engine = requested(env)
    if engine is None:
        return None
    gap = {
        "fsdp": "FSDP2 shards the model in place, while tinylmm's stages change its structure between them "
        "(adapters, 4-bit LLM, merges), and step checkpoints and final/ read state_dict(), DTensor shards there",
        "deepspeed": "tinylmm's loop prepares no DataLoader (train_micro_batch_size_per_gpu must be set) and "
        "accumulates, clips and guards its steps itself, which DeepSpeed's engine also does; ZeRO-3 partitions "
        "the parameters in place, while tinylmm's stages change the model's structure between them",
    }[engine]
    return (
        f"{describe(env)}: tinylmm has parsed this accelerate config but not yet trained under it (no GPU in its "
        f"tests); known open point: {gap}. DDP (ddp.yaml) is the tested multi-process path (README: Scale-out)"
    )
