"""Convolutional blocks of the locality-keeping connectors, in plain torch, each with its
replay for the memory planner (`trace(ctx, tr, per_sample, x)`: `tr` counts per grid
position, `per_sample` once per image).

The RegNet bottleneck is the block Honeybee's C-Abstractor stacks (honeybee/projectors/
projectors.py builds it as timm's `RegStage(depth, in, out, stride=1, dilation=1,
act_layer=nn.SiLU, norm_layer=LayerNorm2d)`). What timm's `regnet.Bottleneck` does with
those arguments and its defaults (bottle_ratio=1, group_size=1, se_ratio=0.25,
downsample='conv1x1', linear_out=False), written again here:

    conv1  1x1 conv (no bias) -> LayerNorm2d -> SiLU           in -> out channels
    conv2  3x3 depthwise conv (no bias, groups = out) -> LayerNorm2d -> SiLU
    se     squeeze-excite: mean over H, W -> 1x1 conv (bias) to round(in / 4) -> SiLU ->
           1x1 conv (bias) back -> sigmoid, multiplying the features
    conv3  1x1 conv (no bias) -> LayerNorm2d (no activation)
    shortcut  the input, or where in != out a 1x1 conv (no bias) -> LayerNorm2d
    out    SiLU(conv3 + shortcut)

LayerNorm2d is a LayerNorm over the channels (NHWC) with eps 1e-5: timm's ConvNormAct turns
`norm_layer=LayerNorm2d` into its LayerNormAct2d (get_norm_act_layer), whose default eps is
1e-5, not LayerNorm2d's 1e-6. Dropout and drop-path are off in Honeybee's config, so they are
left out. timm is not a dependency (it is not installed here, and the blocks are short).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of [B, C, H, W] (timm's LayerNormAct2d without its activation)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, eps=eps)

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNormAct(nn.Module):
    """A stride-1 conv without bias, LayerNorm2d, and SiLU unless `act=False`."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
        self.norm = LayerNorm2d(cout)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))

    def trace(self, ctx, tr, per_sample, x):
        # the conv saves its input, layer_norm its input and mean/rstd, SiLU its input
        x = tr.layernorm(tr.conv(x, ctx.conv(self.conv)), ctx.norm(self.norm.weight))
        return tr.unary(x) if isinstance(self.act, nn.SiLU) else x


class SqueezeExcite(nn.Module):
    """timm's SEModule with SiLU: a per-channel gate from the image's mean features."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        gate = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)

    def trace(self, ctx, tr, per_sample, x):
        # the mean saves nothing; the two 1x1 convs, SiLU and sigmoid (its output) act on one
        # vector per image; x * gate keeps x when the gate needs a gradient, and the gate
        s = per_sample.conv(per_sample.unary(per_sample.conv(x.like(), ctx.conv(self.fc1))), ctx.conv(self.fc2))
        gate = s.like()
        if s.grad:
            per_sample.save(gate)
            tr.save(x)
        if x.grad:
            per_sample.save(gate)
        return tr.add(x, gate)


class RegNetBottleneck(nn.Module):
    """timm's RegNet Bottleneck as Honeybee configures it (module docstring)."""

    def __init__(self, cin: int, cout: int, se_ratio: float = 0.25):
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout, 1)
        self.conv2 = ConvNormAct(cout, cout, 3, groups=cout)
        self.se = SqueezeExcite(cout, round(cin * se_ratio))
        self.conv3 = ConvNormAct(cout, cout, 1, act=False)
        self.downsample = ConvNormAct(cin, cout, 1, act=False) if cin != cout else None
        self.act = nn.SiLU()

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(self.conv3(self.se(self.conv2(self.conv1(x)))) + shortcut)

    def trace(self, ctx, tr, per_sample, x):
        y = x
        for part in (self.conv1, self.conv2, self.se, self.conv3):
            y = part.trace(ctx, tr, per_sample, y)
        shortcut = x if self.downsample is None else self.downsample.trace(ctx, tr, per_sample, x)
        return tr.unary(tr.add(y, shortcut))


class RegStage(nn.Sequential):
    """`depth` bottlenecks, the first from `cin` to `cout` channels."""

    def __init__(self, depth: int, cin: int, cout: int):
        super().__init__(*(RegNetBottleneck(cin if i == 0 else cout, cout) for i in range(depth)))

    def trace(self, ctx, tr, per_sample, x):
        for block in self:
            x = block.trace(ctx, tr, per_sample, x)
        return x
