"""MobileVLM V2's lightweight downsample projector, LDPv2 (Chu et al., "MobileVLM V2",
2024): an MLP per patch, an average pool to a small grid, then a positional-encoding
generator (PEG, from Twins / CPVT) that gives each token its neighbourhood back.

Followed: mobilevlm/model/vision_projector.py, `LDPNetV2Projector`:

    FeatureIRLayer   Linear(Dv, Dl) -> GELU -> Linear(Dl, Dl)          [B, N, Dl]
    TokenDownLayer   AdaptiveAvgPool2d((12, 12)) over the sqrt N grid  [B, 144, Dl]
    PosInjectLayer   3x3 depthwise Conv2d (bias) + the input (residual) [B, 144, Dl]

MobileVLM V2 fixes the grid at 12 x 12; here it is the option `grid` (default 12).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from tinylmm.errors import ConfigError
from tinylmm.models.connectors.base import CONNECTORS, grid_side


@dataclass
class LDPv2Options:
    grid: int = 12  # side of the pooled grid: grid x grid visual tokens (MobileVLM V2: 12 -> 144)

    def __post_init__(self):
        if self.grid < 1:
            raise ConfigError(f"model.connector.grid={self.grid} must be >= 1 (12: MobileVLM V2's 144 tokens)")


@CONNECTORS.register("ldpv2")
class LDPv2Connector(nn.Module):
    """MobileVLM V2's LDPv2: Linear-GELU-Linear, an average pool to grid x grid, a depthwise 3x3 PEG with residual."""

    Options = LDPv2Options
    tokens_out = "grid^2 (default 144)"

    @staticmethod
    def check_patches(options: LDPv2Options, num_patches: int) -> None:
        grid_side(num_patches, "ldpv2")

    def __init__(self, options: LDPv2Options, vision_dim: int, llm_dim: int):
        super().__init__()
        self.grid = options.grid
        self.mlp = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        self.pool = nn.AdaptiveAvgPool2d((options.grid, options.grid))
        self.peg = nn.Conv2d(llm_dim, llm_dim, 3, padding=1, groups=llm_dim)

    def output_len(self, num_patches: int) -> int:
        grid_side(num_patches, "ldpv2")
        return self.grid * self.grid

    def forward(self, x):
        B, N, _ = x.shape  # [B, N, Dv]
        side = math.isqrt(N)
        x = self.mlp(x)  # [B, N, Dl]
        x = self.pool(x.transpose(1, 2).reshape(B, -1, side, side))  # [B, Dl, grid, grid]
        x = self.peg(x) + x
        return x.flatten(2).transpose(1, 2)  # [B, grid^2, Dl]

    def trace(self, ctx):
        """The planner's replay of `forward` (tinylmm/memory/activations.py: ConnectorTrace):
        the MLP over the N patches, the pool (it saves its input), the PEG's conv over the
        grid (it saves its input; the residual add saves nothing)."""
        patches, grid = ctx.tracer(ctx.tokens_in), ctx.tracer(ctx.tokens_out)
        x = patches.linear(patches.unary(patches.linear(ctx.x, ctx.lin(self.mlp[0]))), ctx.lin(self.mlp[2]))
        if x.grad:
            patches.save(x)  # adaptive_avg_pool2d keeps its input
        pooled = x.like()
        return grid.add(grid.conv(pooled, ctx.conv(self.peg)), pooled)
