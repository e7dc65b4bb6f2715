"""LLaVA-1.5's and TinyLLaVA's projector `mlp2x_gelu`: Linear-GELU-Linear, one visual token per patch."""

from __future__ import annotations

from torch import nn

from tinylmm.models.connectors.base import CONNECTORS, NoOptions


@CONNECTORS.register("mlp2x_gelu")
class MLPConnector(nn.Module):
    """LLaVA-1.5 / TinyLLaVA projector: Linear-GELU-Linear (state-dict keys mlp.0, mlp.2)."""

    Options = NoOptions
    tokens_out = "N (one per patch)"

    def __init__(self, options: NoOptions, vision_dim: int, llm_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def output_len(self, num_patches: int) -> int:
        return num_patches

    def forward(self, x):
        return self.mlp(x)

    def trace(self, ctx):
        """The planner's replay of `forward` (tinylmm/memory/activations.py: ConnectorTrace):
        two linear layers around a GELU, which saves its input."""
        tr = ctx.tracer(ctx.tokens_out)
        return tr.linear(tr.unary(tr.linear(ctx.x, ctx.lin(self.mlp[0]))), ctx.lin(self.mlp[2]))
