"""The optimizer of a stage: torch AdamW (fused where the device has the kernel), or
bitsandbytes' 8-bit / paged AdamW."""

from __future__ import annotations

import torch

from tinylmm.errors import ConfigError

BNB_CLASSES = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}


# Devices where torch's fused AdamW kernel runs: one kernel over all parameters instead of
# a loop of small ops (bench/optimizer_step.py measures it); elsewhere torch's multi-tensor
# foreach path.
FUSED_DEVICES = ("cuda", "cpu", "xpu")


def adamw_implementation(groups: list[dict], device: torch.device) -> str:
    """ "fused" where torch's fused AdamW supports the parameters' device and dtypes, else "foreach"."""
    params = [p for g in groups for p in g["params"]]
    kinds = {p.device.type for p in params} or {device.type}
    ok = len(kinds) == 1 and kinds <= set(FUSED_DEVICES) and all(p.is_floating_point() for p in params)
    return "fused" if ok else "foreach"


def build_optimizer(groups: list[dict], name: str, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """-> (optimizer, a sentence for the log saying what was taken)."""
    kwargs = {"betas": (0.9, 0.999), "eps": 1e-8}
    if name == "adamw":
        impl = adamw_implementation(groups, device)
        return torch.optim.AdamW(groups, **kwargs, **{impl: True}), f"AdamW (torch, {impl}, fp32 states)"
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            f"train.optimizer={name} needs bitsandbytes: pip install peft bitsandbytes (tinylmm's dependencies; "
            "did the install fail on this platform?)"
        ) from None
    cls = getattr(bnb.optim, BNB_CLASSES[name])
    note = f"{BNB_CLASSES[name]} (bitsandbytes"
    if name.startswith("paged") and device.type != "cuda":
        # Paging moves optimizer state between GPU and CPU memory under pressure; without a
        # GPU there is nothing to page to, so the states simply live in RAM.
        note += "; paging needs CUDA: on this device the states are ordinary memory"
    return cls(groups, **kwargs), note + ")"
