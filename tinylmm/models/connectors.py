"""Connectors: vision features [B, N, Dv] -> visual tokens [B, M, Dl].

One small class per connector, registered under its exact name.
"""

from __future__ import annotations

import torch
from torch import nn

from tinylmm.config import ConfigError, ConnectorSpec, unknown

CONNECTORS: dict[str, type[nn.Module]] = {}


def register(name: str):
    def deco(cls):
        CONNECTORS[name] = cls
        cls.registry_name = name
        return cls

    return deco


@register("linear")
class LinearConnector(nn.Module):
    """LLaVA-1's single projection; one visual token per patch."""

    def __init__(self, spec: ConnectorSpec, vision_dim: int, llm_dim: int):
        super().__init__()
        self.proj = nn.Linear(vision_dim, llm_dim)

    def output_len(self, num_patches: int) -> int:
        return num_patches

    def forward(self, x):
        return self.proj(x)


@register("mlp2x_gelu")
class MLPConnector(nn.Module):
    """LLaVA-1.5 / TinyLLaVA projector: Linear-GELU-Linear (state-dict keys mlp.0, mlp.2)."""

    def __init__(self, spec: ConnectorSpec, vision_dim: int, llm_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def output_len(self, num_patches: int) -> int:
        return num_patches

    def forward(self, x):
        return self.mlp(x)


class _CrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q, kv):
        qn = self.norm_q(q)
        # Perceiver/Flamingo: the latents attend to the features and to themselves.
        kvn = torch.cat([self.norm_kv(kv), qn], dim=1)
        q = q + self.attn(qn, kvn, kvn, need_weights=False)[0]
        return q + self.ff(self.norm_ff(q))


@register("resampler")
class ResamplerConnector(nn.Module):
    """Perceiver-style resampler: `num_queries` learned latents cross-attend to the patch
    features through `depth` blocks, so M is fixed whatever the image resolution."""

    def __init__(self, spec: ConnectorSpec, vision_dim: int, llm_dim: int):
        super().__init__()
        if llm_dim % spec.num_heads:
            raise ConfigError(
                f"model.connector.num_heads={spec.num_heads} does not divide the LLM width {llm_dim}"
            )
        if spec.num_queries < 1 or spec.depth < 1:
            raise ConfigError("model.connector.num_queries and depth must be >= 1")
        self.num_queries = spec.num_queries
        self.proj_in = nn.Linear(vision_dim, llm_dim)
        self.queries = nn.Parameter(torch.randn(spec.num_queries, llm_dim) * llm_dim**-0.5)
        self.blocks = nn.ModuleList(_CrossAttentionBlock(llm_dim, spec.num_heads) for _ in range(spec.depth))
        self.norm_out = nn.LayerNorm(llm_dim)

    def output_len(self, num_patches: int) -> int:
        return self.num_queries

    def forward(self, x):
        kv = self.proj_in(x)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1).to(kv.dtype)
        for block in self.blocks:
            q = block(q, kv)
        return self.norm_out(q)


def build_connector(spec: ConnectorSpec, vision_dim: int, llm_dim: int) -> nn.Module:
    if spec.type not in CONNECTORS:
        raise unknown("connector", spec.type, CONNECTORS)
    return CONNECTORS[spec.type](spec, vision_dim, llm_dim)
