"""Whether an LLM confines attention to each sample of a packed row (tinylmm.data.packing).

transformers builds the block-diagonal mask from position ids only where a model passes
its position ids to `masking_utils.create_causal_mask` and the attention kernel honours the
mask; a model that does not would let every sample see the ones before it, silently. On
transformers 5.24 this probe found tiny random LLaMA, Qwen2, Qwen3, Phi, Phi-3 and
Gemma-3 (sdpa and eager) and Gemma-2 (eager; it has no sdpa) confined (leak 0.0; the toy's LLaMA
leaks 0.8-1.2 with the packed-sequence detection switched off). So before a packed stage trains, two short segments of
random embeddings go through the decoder packed and the second one alone: its hidden
states must agree (the GPU-only speed-ups degrade loudly; a wrong mask must not pass).
"""

from __future__ import annotations

import torch

from tinylmm.errors import ConfigError


@torch.no_grad()
def packing_leak(llm, first: int = 5, second: int = 6, seed: int = 0) -> float:
    """Mean absolute difference between the second segment's last hidden states packed
    after a first segment and alone, relative to their mean magnitude: 0 where attention is
    confined, up to rounding (below 1e-2 in bf16); a leak moves them by a large fraction."""
    decoder = llm.get_decoder()
    weight = llm.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    scale = float(weight.detach().float().std()) or 1.0
    embeds = (torch.randn(1, first + second, weight.shape[1], generator=g) * scale).to(weight.device, weight.dtype)
    positions = torch.cat([torch.arange(first), torch.arange(second)])[None].to(weight.device)
    was_training = llm.training
    llm.eval()  # no dropout: both passes must see the same weights
    try:
        packed = decoder(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state[:, first:]
        alone = decoder(
            inputs_embeds=embeds[:, first:], position_ids=positions[:, first:], use_cache=False
        ).last_hidden_state
    finally:
        llm.train(was_training)
    packed, alone = packed.float(), alone.float()
    return float((packed - alone).abs().mean() / alone.abs().mean().clamp_min(1e-12))


def check_packing(llm, where: str = "train.packing", tolerance: float = 0.05) -> None:
    """ConfigError naming the LLM when a packed sample would attend to the previous one."""
    leak = packing_leak(llm)
    if not leak <= tolerance:
        attn = getattr(llm.config, "_attn_implementation", "?")
        raise ConfigError(
            f"{where}: the LLM ({type(llm).__name__}, {attn} attention) does not confine attention to each "
            f"packed sample (hidden states differ by {leak:.3g} relative from the sample run alone); "
            f"set train.packing=false"
        )
