"""Honeybee's D-Abstractor (Cha et al., CVPR 2024): a deformable-attention decoder that
reads the patch grid through a few learned sampling points per query, so the M visual
tokens it makes keep the locality of the grid.

What it follows (kakaobrain/honeybee honeybee/projectors/dabs.py, configs/model_config/d-abs.yaml,
built on transformers' DeformableDetrDecoder with DeformableDetrConfig's defaults, and
Deformable DETR, Zhu et al., ICLR 2021, section 4.1 and appendix A.2):

- the features go through `input_proj` (Dv -> hidden_size; none when equal) and get a
  learnable position embedding per patch (`pos_emb: True`, trunc-normal, std 0.02);
- the queries: the decoder's input is a learnable embedding per query, and its query
  position embedding is the features adaptive-average-pooled to a sqrt(M) x sqrt(M) grid
  (`pooled_v_target: query`);
- one learnable reference point per query, started on a uniform sqrt(M) x sqrt(M) grid
  spanning the patch centres (`manual_init_refPoints`, `learnable_mRP`), in [0, 1] (x, y);
- `layers` post-norm decoder layers as Deformable DETR's: self-attention among the queries
  (position added to q and k, not v), multi-scale deformable cross-attention (position
  added to the query; `heads` heads x 1 level x `points` points; offsets in units of the
  grid), a ReLU MLP of `intermediate_size`; dropout after each branch, LayerNorm after
  each residual;
- `output_proj` to the LLM width (none when equal). No extra (EOS) tokens (`num_eos_tokens: 0`).

Defaults are Honeybee's d-abs.yaml (hidden 1024, 6 layers, 144 queries) and, where it sets
nothing, DeformableDetrConfig's (8 heads, 4 points, FFN 1024, dropout 0.1). The sampling
offsets start on Deformable DETR's pattern (head h looks along angle 2*pi*h/heads, point k
at k+1 cells), the attention weights at zero (uniform), as its `_reset_parameters` does.

Multi-scale deformable attention runs in pure PyTorch (`ms_deform_attn`, bilinear
`grid_sample`, the reference implementation Deformable DETR gives beside its CUDA kernel),
so it runs on the CPU. Like Honeybee ("deformable attention only supports fp32") the
sampling runs in fp32 under mixed precision. No fused kernel is used: none is installed
here (Deformable DETR's `MultiScaleDeformableAttention` extension is a CUDA build of its
own); the plan says so in its notes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tinylmm.errors import ConfigError
from tinylmm.models.connectors.base import CONNECTORS, grid_side

KERNEL_NOTE = "connector 'd_abstractor': deformable attention in pure PyTorch (grid_sample, fp32); no fused kernel"


def ms_deform_attn(value, shapes, locations, weights):
    """Multi-scale deformable attention, sampled with `grid_sample`.

    value      [B, S, H, Dh]  the levels' feature maps, each flattened row-major, concatenated
    shapes     [(h, w), ...]  each level's grid (sum of h * w = S)
    locations  [B, Q, H, L, P, 2]  sampling points (x, y) in [0, 1] of each level's map
    weights    [B, Q, H, L, P]  attention weights (softmax over L * P)
    returns    [B, Q, H * Dh]
    """
    B, _, H, Dh = value.shape
    _, Q, _, L, P, _ = locations.shape
    grids = 2 * locations - 1  # grid_sample's [-1, 1]; align_corners=False: pixel i at (i + 0.5) / w
    sampled, start = [], 0
    for level, (h, w) in enumerate(shapes):
        v = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(B * H, Dh, h, w)
        g = grids[:, :, :, level].transpose(1, 2).reshape(B * H, Q, P, 2)
        # [B*H, Dh, Q, P]; points off the map read zeros
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
        start += h * w
    sampled = sampled[0] if L == 1 else torch.cat(sampled, dim=-1)  # [B*H, Dh, Q, L*P]
    w = weights.transpose(1, 2).reshape(B * H, 1, Q, L * P)
    out = (sampled * w).sum(-1)  # [B*H, Dh, Q]
    return out.view(B, H * Dh, Q).transpose(1, 2)


class _SelfAttention(nn.Module):
    """Attention among the queries; the position embedding goes into q and k, not v."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, h, pos):
        B, M, D = h.shape
        qk = h + pos

        def heads(t):  # [B, M, D] -> [B, H, M, D/H]
            return t.view(B, M, self.heads, D // self.heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(self.q_proj(qk)), heads(self.k_proj(qk)), heads(self.v_proj(h)))
        return self.o_proj(o.transpose(1, 2).reshape(B, M, D))


class _DeformableCrossAttention(nn.Module):
    """Deformable DETR's MSDeformAttn on one level: per head, `points` learned offsets from
    the query's reference point and softmax weights, both predicted from the query."""

    def __init__(self, dim: int, heads: int, points: int, levels: int = 1):
        super().__init__()
        self.heads, self.points, self.levels = heads, points, levels
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        with torch.no_grad():
            angles = torch.arange(heads, dtype=torch.float32) * (2 * math.pi / heads)
            direction = torch.stack([angles.cos(), angles.sin()], -1)
            direction = direction / direction.abs().max(-1, keepdim=True).values  # onto the square's edge
            steps = torch.arange(1, points + 1, dtype=torch.float32)
            grid = direction[:, None, None, :] * steps[None, None, :, None]  # [H, 1, P, 2]
            self.sampling_offsets.weight.zero_()
            self.sampling_offsets.bias.copy_(grid.expand(heads, levels, points, 2).flatten())
            self.attention_weights.weight.zero_()
            self.attention_weights.bias.zero_()
            for m in (self.value_proj, self.output_proj):
                nn.init.xavier_uniform_(m.weight)
                m.bias.zero_()

    def forward(self, query, value_in, reference, grid: tuple[int, int]):
        B, M, D = query.shape
        H, L, P = self.heads, self.levels, self.points
        value = self.value_proj(value_in).view(B, value_in.shape[1], H, D // H)
        offsets = self.sampling_offsets(query).view(B, M, H, L, P, 2)
        weights = F.softmax(self.attention_weights(query).float().view(B, M, H, L * P), -1).view(B, M, H, L, P)
        # offsets are in cells of the grid: divided by (w, h) they are in the map's [0, 1]
        scale = torch.tensor([1 / grid[1], 1 / grid[0]], device=query.device)
        locations = reference[None, :, None, None, None, :].float() + offsets.float() * scale
        out = ms_deform_attn(value.float(), [grid], locations, weights)
        return self.output_proj(out.to(query.dtype).contiguous())  # back to the stream's dtype


class _DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, points: int, ffn: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.self_attn = _SelfAttention(dim, heads)
        self.self_attn_norm = nn.LayerNorm(dim)
        self.cross_attn = _DeformableCrossAttention(dim, heads, points)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.final_norm = nn.LayerNorm(dim)

    def _drop(self, t):
        return F.dropout(t, self.dropout, self.training)

    def forward(self, h, pos, value_in, reference, grid):
        h = self.self_attn_norm(h + self._drop(self.self_attn(h, pos)))
        h = self.cross_attn_norm(h + self._drop(self.cross_attn(h + pos, value_in, reference, grid)))
        return self.final_norm(h + self._drop(self.fc2(F.relu(self.fc1(h)))))


@dataclass
class DAbstractorOptions:
    """`model.connector` keys of `d_abstractor`: M = num_queries tokens out, a perfect square
    (its queries' grid; it may exceed N); the tower's grid must be square."""

    num_queries: int = 144  # visual tokens per image (M): a perfect square, the queries' grid
    layers: int = 6  # decoder layers
    heads: int = 8  # attention heads (self- and deformable cross-attention)
    points: int = 4  # sampling points per head and query
    hidden_size: int = 1024  # the decoder's width
    intermediate_size: int = 1024  # the decoder MLP's width
    dropout: float = 0.1  # after each attention and MLP branch, in training


@CONNECTORS.register("d_abstractor")
class DAbstractor(nn.Module):
    """Honeybee's D-Abstractor: `num_queries` (M, a perfect square) queries on a sqrt(M) x
    sqrt(M) grid of learnable reference points read the patch grid by deformable attention
    through `layers` decoder layers; M tokens out, whatever N (M may exceed N)."""

    Options = DAbstractorOptions
    tokens_out = "M = num_queries (a perfect square; may exceed N)"
    takes_num_patches = True

    def __init__(self, options: DAbstractorOptions, vision_dim: int, llm_dim: int, *, num_patches: int | None = None):
        super().__init__()
        o = options
        side = grid_side(num_patches, "d_abstractor")
        q_side = math.isqrt(max(o.num_queries, 0))
        if o.num_queries < 1 or q_side * q_side != o.num_queries:
            near = sorted({max(1, q_side) ** 2, (q_side + 1) ** 2})
            raise ConfigError(
                f"model.connector.num_queries={o.num_queries}: d_abstractor puts its queries on a sqrt(M) x sqrt(M) "
                f"grid, so M must be a perfect square (the tower's grid is {side} x {side}; nearest: "
                f"{', '.join(map(str, near))}; e.g. 64, 144, 256, {side * side})"
            )
        for key in ("layers", "heads", "points", "hidden_size", "intermediate_size"):
            if getattr(o, key) < 1:
                raise ConfigError(f"model.connector.{key}={getattr(o, key)}: must be >= 1")
        if o.hidden_size % o.heads:
            raise ConfigError(
                f"model.connector.heads={o.heads} does not divide model.connector.hidden_size={o.hidden_size}"
            )
        if not 0 <= o.dropout < 1:
            raise ConfigError(f"model.connector.dropout={o.dropout}: must be in [0, 1)")
        d = o.hidden_size
        self.num_queries, self.grid, self.q_side = o.num_queries, (side, side), q_side
        self.input_proj = nn.Linear(vision_dim, d) if vision_dim != d else nn.Identity()
        self.pos_emb = nn.Parameter(nn.init.trunc_normal_(torch.zeros(side * side, d), std=0.02))
        self.query_embed = nn.Parameter(torch.randn(o.num_queries, d))
        ticks = (torch.linspace(0.5, side - 0.5, q_side) if q_side > 1 else torch.tensor([side / 2])) / side
        ys, xs = torch.meshgrid(ticks, ticks, indexing="ij")
        self.reference_points = nn.Parameter(torch.stack([xs.flatten(), ys.flatten()], -1))  # [M, 2] (x, y)
        self.layers = nn.ModuleList(
            _DecoderLayer(d, o.heads, o.points, o.intermediate_size, o.dropout) for _ in range(o.layers)
        )
        self.output_proj = nn.Linear(d, llm_dim) if llm_dim != d else nn.Identity()

    def output_len(self, num_patches: int) -> int:
        return self.num_queries

    def forward(self, x):
        B = x.shape[0]
        v = self.input_proj(x) + self.pos_emb  # [B, N, d]
        # the query positions: the features pooled to the queries' grid
        pooled = F.adaptive_avg_pool2d(v.transpose(1, 2).unflatten(2, self.grid), self.q_side)  # [B, d, s, s]
        pos = pooled.flatten(2).transpose(1, 2)  # [B, M, d]
        h = self.query_embed.expand(B, -1, -1)
        for layer in self.layers:
            h = layer(h, pos, v, self.reference_points, self.grid)
        return self.output_proj(h)  # [B, M, Dl]

    def trace(self, ctx):
        """The planner's replay of `forward` (tinylmm/memory/activations.py: ConnectorTrace),
        checked against torch's saved tensors by tests/test_connectors_attention.py."""
        ctx.notes.append(KERNEL_NOTE)
        patches, queries = ctx.tracer(ctx.tokens_in), ctx.tracer(ctx.tokens_out)
        lin = ctx.lin
        v = patches.linear(ctx.x, lin(self.input_proj)) if isinstance(self.input_proj, nn.Linear) else ctx.x
        pe = ctx.norm(self.pos_emb)
        v = ctx.tensor(v.n, max(v.b, pe.wbytes), v.grad or pe.trainable)
        if v.grad:
            patches.save(v)  # the pooling keeps its input (a view of v)
        pos = ctx.tensor(v.n, v.b, v.grad)
        qe = ctx.norm(self.query_embed)
        h = ctx.tensor(v.n, qe.wbytes, qe.trainable)  # the query parameter, expanded
        ref = ctx.norm(self.reference_points)
        for layer in self.layers:
            h = _trace_layer(ctx, layer, patches, queries, h, pos, v, ref)
        if isinstance(self.output_proj, nn.Linear):
            return queries.linear(h, lin(self.output_proj))
        return h


def _trace_layer(ctx, layer: _DecoderLayer, patches, queries, h, pos, v, ref):
    q, lin, p = queries, ctx.lin, layer.dropout
    sa, ca = layer.self_attn, layer.cross_attn
    # self-attention: q, k from h + pos, v from h
    qk = q.add(h, pos)
    vv = q.linear(h, lin(sa.v_proj))  # on the expanded query parameter, it keeps a copy (a reshape)
    qq, kk = q.linear(qk, lin(sa.q_proj)), q.linear(qk, lin(sa.k_proj))
    o = q.sdpa(qq, kk, vv, sa.heads, repeat_kv=False, mask=False, eager=False)
    a = q.dropout(q.linear(o, lin(sa.o_proj)), p)  # sdpa's output is [B, M, H, Dh] in memory: merging heads is a view
    h = q.layernorm(q.add(h, a), ctx.norm(layer.self_attn_norm.weight))
    # deformable cross-attention, sampled in fp32
    qc = q.add(h, pos)
    offsets = q.linear(qc, lin(ca.sampling_offsets))
    logits = q.linear(qc, lin(ca.attention_weights))
    value = patches.linear(v, lin(ca.value_proj))
    hlp = ca.heads * ca.levels * ca.points
    weights = ctx.tensor(hlp, 4, logits.grad)
    if weights.grad:
        q.save(weights)  # softmax keeps its output
    grid = ctx.tensor(2 * hlp, 4, offsets.grad or ref.trainable)
    value_map = ctx.tensor(value.n, 4, value.grad)  # the fp32 copy in grid_sample's layout
    if value_map.grad or grid.grad:
        patches.save(value_map)
        q.save(grid)
    sampled = ctx.tensor(value.n * ca.points * ca.levels, 4, value_map.grad or grid.grad)
    w_copy = weights.like()  # the weights in the product's layout (a copy)
    out = q.mul(sampled, w_copy)
    out = ctx.tensor(value.n, qc.b, out.grad)  # summed over the points, in the query's dtype, contiguous
    a = q.dropout(q.linear(out, lin(ca.output_proj)), p)
    h = q.layernorm(q.add(h, a), ctx.norm(layer.cross_attn_norm.weight))
    # the ReLU MLP: relu keeps its output, which fc2 keeps as its input (one tensor)
    f = q.linear(h, lin(layer.fc1))
    r = f.like()
    if r.grad:
        q.save(r)
    a = q.dropout(q.linear(r, lin(layer.fc2)), p)
    return q.layernorm(q.add(h, a), ctx.norm(layer.final_norm.weight))
