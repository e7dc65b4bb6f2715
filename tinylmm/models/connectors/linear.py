"""LLaVA-1's projector: one linear layer, one visual token per patch."""

from __future__ import annotations

from torch import nn

from tinylmm.models.connectors.base import CONNECTORS, NoOptions


@CONNECTORS.register("linear")
class LinearConnector(nn.Module):
    """LLaVA-1's single projection; one visual token per patch."""

    Options = NoOptions
    tokens_out = "N (one per patch)"

    def __init__(self, options: NoOptions, vision_dim: int, llm_dim: int):
        super().__init__()
        self.proj = nn.Linear(vision_dim, llm_dim)

    def output_len(self, num_patches: int) -> int:
        return num_patches

    def forward(self, x):
        return self.proj(x)

    def trace(self, ctx):
        """The planner's replay of `forward` (tinylmm/memory/activations.py: ConnectorTrace)."""
        return ctx.tracer(ctx.tokens_out).linear(ctx.x, ctx.lin(self.proj))
