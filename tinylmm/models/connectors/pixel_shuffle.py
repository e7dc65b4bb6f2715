"""Pixel shuffle (space-to-depth), the connector of Idefics3 / SmolVLM and nanoVLM: each
s x s block of neighbouring patches is folded into one token of s^2 x Dv channels, then
one linear layer without bias maps it to the LLM width: N / s^2 tokens.

Followed: nanoVLM models/modality_projector.py (`ModalityProjector.pixel_shuffle`: the
grid [B, h, w, D] split into (h/s, s, w/s, s), the two s axes moved next to the channels,
row-major within a block; then `nn.Linear(D * s^2, Dl, bias=False)`). nanoVLM asserts that
s divides the grid side; here that is a ConfigError at config validation that names the
tower's grid and the factors that work.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tinylmm.errors import ConfigError
from tinylmm.models.connectors.base import CONNECTORS, grid_side


@dataclass
class PixelShuffleOptions:
    factor: int = 2  # s: s x s neighbouring patches per visual token (Idefics3's scale_factor)

    def __post_init__(self):
        if self.factor < 1:
            raise ConfigError(f"model.connector.factor={self.factor} must be >= 1")


def working_factors(side: int) -> list[int]:
    return [s for s in range(2, side + 1) if side % s == 0]


@CONNECTORS.register("pixel_shuffle")
class PixelShuffleConnector(nn.Module):
    """SmolVLM / nanoVLM pixel shuffle: s x s neighbours folded into channels, then one linear layer without bias."""

    Options = PixelShuffleOptions
    tokens_out = "N / factor^2 (factor must divide the grid side)"

    @staticmethod
    def check_patches(options: PixelShuffleOptions, num_patches: int) -> int:
        side = grid_side(num_patches, "pixel_shuffle")
        if side % options.factor:
            works = working_factors(side)
            raise ConfigError(
                f"model.connector.factor={options.factor} does not divide the tower's {side} x {side} grid "
                f"of patches ({num_patches} tokens); factors that work: "
                + (", ".join(map(str, works)) if works else "only 1")
            )
        return side

    def __init__(self, options: PixelShuffleOptions, vision_dim: int, llm_dim: int):
        super().__init__()
        self.factor = options.factor
        self.proj = nn.Linear(vision_dim * self.factor**2, llm_dim, bias=False)
        if self.proj.weight.device.type != "meta":
            nn.init.normal_(self.proj.weight, std=0.02)  # nanoVLM's initialisation

    def output_len(self, num_patches: int) -> int:
        self.check_patches(PixelShuffleOptions(self.factor), num_patches)
        return num_patches // self.factor**2

    def forward(self, x):
        B, N, D = x.shape  # [B, N, Dv]
        s, side = self.factor, self.check_patches(PixelShuffleOptions(self.factor), N)
        x = x.reshape(B, side // s, s, side // s, s, D).permute(0, 1, 3, 2, 4, 5)  # [B, h/s, w/s, s, s, Dv]
        return self.proj(x.reshape(B, N // s**2, s * s * D))  # [B, N / s^2, Dl]

    def trace(self, ctx):
        """The planner's replay of `forward` (tinylmm/memory/activations.py: ConnectorTrace):
        the shuffle is a copy that saves nothing; the linear layer keeps it when it trains."""
        tr = ctx.tracer(ctx.tokens_out)
        folded = ctx.tensor(ctx.x.n * self.factor**2, ctx.x.b, ctx.x.grad)
        return tr.linear(folded, ctx.lin(self.proj))
