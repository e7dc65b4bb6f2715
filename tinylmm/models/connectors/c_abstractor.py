"""Honeybee's C-Abstractor (Cha et al., "Honeybee: Locality-enhanced Projector for
Multimodal LLM", CVPR 2024): convolutions keep each visual token tied to its
neighbourhood while an adaptive pool sets the token count.

Followed: honeybee/projectors/projectors.py (`CAbstractor`, `ConvProjector`, `Projector`)
and configs/model_config/c-abs.yaml (depth 3, mlp_depth 2, hidden_size 1024, pos_emb on,
prenorm off, no eos tokens, 144 queries):

    x + pos_emb                      a learnable [1, N, Dv] position embedding (trunc-normal, std 0.02)
    [B, N, Dv] -> [B, Dv, h, w]      the patches as their grid
    RegStage(depth, Dv -> hidden)    RegNet bottlenecks (conv_blocks.py)
    AdaptiveAvgPool2d(sqrt M)        to the query grid (M may exceed N: the pool then repeats)
    RegStage(depth, hidden -> hidden)
    [B, hidden, s, s] -> [B, M, hidden]
    readout                          Linear(hidden, Dl), then (mlp_depth - 1) x [SiLU, Linear(Dl, Dl)]

Initialisation as Honeybee's `_init_weights` (honeybee/common_layers.py): convs and linear
layers N(0, 0.02) with zero biases.

Where this differs: Honeybee adds the position embedding in place (`x += pos_emb`) on the
tower's output; here it is added out of place, so a frozen tower's output is left as it
was. Honeybee's `depth: 0` variant (the pool alone) is not offered: depth >= 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tinylmm.errors import ConfigError
from tinylmm.models.connectors.base import CONNECTORS, grid_side
from tinylmm.models.connectors.conv_blocks import RegStage


@dataclass
class CAbstractorOptions:
    num_queries: int = 144  # M, a perfect square (the pooled grid is sqrt M x sqrt M)
    depth: int = 3  # L: RegNet bottlenecks before and after the pool
    hidden_size: int = 1024  # channels of the blocks
    mlp_depth: int = 2  # linear layers of the readout

    def __post_init__(self):
        side = math.isqrt(max(self.num_queries, 0))
        if self.num_queries < 1 or side * side != self.num_queries:
            near = [s * s for s in (side, side + 1) if s > 0]
            raise ConfigError(
                f"model.connector.num_queries={self.num_queries}: the C-Abstractor pools to a square grid, "
                f"so M must be a perfect square (e.g. {' or '.join(map(str, near))})"
            )
        for key in ("depth", "hidden_size", "mlp_depth"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.connector.{key}={getattr(self, key)} must be >= 1")


def readout_mlp(depth: int, dim_in: int, dim_out: int) -> nn.Sequential:
    """Honeybee's `build_mlp`: Linear(in, out), then (depth - 1) x [SiLU, Linear(out, out)]."""
    layers: list[nn.Module] = [nn.Linear(dim_in, dim_out)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Linear(dim_out, dim_out)]
    return nn.Sequential(*layers)


def trace_readout(ctx, tr, x, mlp: nn.Sequential):
    for layer in mlp:
        x = tr.linear(x, ctx.lin(layer)) if isinstance(layer, nn.Linear) else tr.unary(x)
    return x


def _honeybee_init(module):
    """Honeybee's `_init_weights` (honeybee/common_layers.py), run by transformers' post_init:
    conv and linear weights N(0, 0.02), their biases 0 (LayerNorms start at 1 and 0 anyway)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@CONNECTORS.register("c_abstractor")
class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor: RegNet blocks, an adaptive pool to sqrt(M) x sqrt(M), RegNet blocks, an MLP."""

    Options = CAbstractorOptions
    tokens_out = "M = num_queries (a perfect square; may exceed N)"
    takes_num_patches = True

    @staticmethod
    def check_patches(options: CAbstractorOptions, num_patches: int) -> None:
        grid_side(num_patches, "c_abstractor")

    def __init__(self, options: CAbstractorOptions, vision_dim: int, llm_dim: int, *, num_patches: int):
        super().__init__()
        self.check_patches(options, num_patches)
        self.num_patches, self.num_queries = num_patches, options.num_queries
        self.pos_emb = nn.Parameter(torch.empty(1, num_patches, vision_dim))
        if self.pos_emb.device.type != "meta":
            nn.init.trunc_normal_(self.pos_emb, std=0.02)
        side = math.isqrt(options.num_queries)
        self.stage1 = RegStage(options.depth, vision_dim, options.hidden_size)
        self.pool = nn.AdaptiveAvgPool2d((side, side))
        self.stage2 = RegStage(options.depth, options.hidden_size, options.hidden_size)
        self.readout = readout_mlp(options.mlp_depth, options.hidden_size, llm_dim)
        if self.pos_emb.device.type != "meta":
            self.apply(_honeybee_init)

    def output_len(self, num_patches: int) -> int:
        if num_patches != self.num_patches:
            raise ConfigError(
                f"connector 'c_abstractor' was built for {self.num_patches} patches (its position embedding); "
                f"the tower hands it {num_patches}"
            )
        return self.num_queries

    def forward(self, x):
        B, N, D = x.shape  # [B, N, Dv]
        side = math.isqrt(N)
        x = (x + self.pos_emb).transpose(1, 2).reshape(B, D, side, side)  # [B, Dv, h, w]
        x = self.stage2(self.pool(self.stage1(x)))  # [B, hidden, sqrt M, sqrt M]
        return self.readout(x.flatten(2).transpose(1, 2))  # [B, M, Dl]

    def trace(self, ctx):
        """The planner's replay of `forward` (tinylmm/memory/activations.py: ConnectorTrace):
        the blocks over the N patches, the pool (it saves its input), the blocks over the M
        queries, the readout; squeeze-excite's vectors once per image."""
        patches, queries, per_sample = ctx.tracer(ctx.tokens_in), ctx.tracer(ctx.tokens_out), ctx.tracer(1)
        pos = ctx.norm(self.pos_emb)  # x + pos_emb: the wider dtype of the two, saves nothing
        x = ctx.tensor(ctx.x.n, max(ctx.x.b, pos.wbytes), ctx.x.grad or pos.trainable)
        x = self.stage1.trace(ctx, patches, per_sample, x)
        if x.grad:
            patches.save(x)  # adaptive_avg_pool2d keeps its input
        x = self.stage2.trace(ctx, queries, per_sample, x.like())
        return trace_readout(ctx, queries, x, self.readout)
