"""A Perceiver-style resampler (Flamingo, Qwen-VL): a fixed number of learned queries
cross-attend to the patch features, so the LLM reads M tokens whatever the resolution."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tinylmm.errors import ConfigError
from tinylmm.models.connectors.base import CONNECTORS


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


@dataclass
class ResamplerOptions:
    num_queries: int = 64  # visual tokens per image (M)
    depth: int = 2  # cross-attention blocks
    num_heads: int = 8


@CONNECTORS.register("resampler")
class ResamplerConnector(nn.Module):
    """Perceiver-style resampler: `num_queries` learned latents cross-attend to the patch
    features through `depth` blocks, so M is fixed whatever the image resolution."""

    Options = ResamplerOptions
    tokens_out = "M = num_queries"

    def __init__(self, options: ResamplerOptions, vision_dim: int, llm_dim: int):
        super().__init__()
        if llm_dim % options.num_heads:
            raise ConfigError(f"model.connector.num_heads={options.num_heads} does not divide the LLM width {llm_dim}")
        if options.num_queries < 1 or options.depth < 1:
            raise ConfigError("model.connector.num_queries and depth must be >= 1")
        self.num_queries = options.num_queries
        self.proj_in = nn.Linear(vision_dim, llm_dim)
        self.queries = nn.Parameter(torch.randn(options.num_queries, llm_dim) * llm_dim**-0.5)
        self.blocks = nn.ModuleList(_CrossAttentionBlock(llm_dim, options.num_heads) for _ in range(options.depth))
        self.norm_out = nn.LayerNorm(llm_dim)

    def output_len(self, num_patches: int) -> int:
        return self.num_queries

    def forward(self, x):
        kv = self.proj_in(x)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1).to(kv.dtype)
        for block in self.blocks:
            q = block(q, kv)
        return self.norm_out(q)

    def trace(self, ctx):
        """The planner's estimate, rough: proj_in over the N patches, then per block the
        norms, keys and values over the patches and about 16 x width bytes per query (q,
        attention, the 4x MLP). Not yet checked against torch."""
        ctx.notes.append("connector 'resampler': its activations are estimated roughly")
        patches = ctx.tracer(ctx.tokens_in)
        kv = patches.linear(ctx.x, ctx.lin(self.proj_in))
        grad = ctx.x.grad or any(ctx.trains(p) for p in self.parameters())
        if grad:
            patches.save(ctx.tensor(3 * kv.n, patches.c, False))  # norm, k, v
            queries = ctx.tracer(ctx.tokens_out)
            queries.save(ctx.tensor(len(self.blocks) * 16 * kv.n, queries.c, False))
        return ctx.tensor(kv.n, patches.c, grad)
