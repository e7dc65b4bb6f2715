"""A BLIP-2-style Q-Former as TinyLLaVA_Factory builds its `qformer` connector
(tinyllava/model/connector/qformer.py, on BLIP-2's Qformer.py BERT): learned queries run
through BERT layers; every `cross_attention_every`-th layer (0, 2, 4 ... for 2) also
cross-attends to the patch features; a linear projector maps the queries to the LLM width.
M = `num_queries` tokens out, whatever N.

What it follows from TinyLLaVA's variant: bert-base-uncased's shape (hidden 768, 12 layers,
12 heads, intermediate 3072, GELU, LayerNorm eps 1e-12, hidden dropout 0.1), cross-attention
every 2nd layer with keys and values from the Dv-wide features (`encoder_width`), 128 queries
(its `num_queries` default); the word and position embeddings are removed and the embedding
LayerNorm loses its weight and bias (TinyLLaVA sets both to None), so the queries are only
normalised; the text branch's feed-forward is removed, the queries' (`intermediate_query`,
`output_query`) kept; post-norm residual blocks as BERT's.

Where it differs, and why:
- Random initialisation, never a hub download: TinyLLaVA reads bert-base-uncased's config
  from the hub (its weights are not loaded either: `BertModel(config=...)`); here the shape
  is these options' defaults, so building it needs no network. The queries start as
  BERT's initializer range (normal, std 0.02); the linear layers keep PyTorch's default.
- No dropout on the attention probabilities (BERT's 0.1): attention runs in
  `scaled_dot_product_attention`, whose dropout the planner cannot count; the hidden
  dropout (after each attention output and the MLP) is kept.
- No attention masks: every query and every patch is valid (TinyLLaVA passes all-ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tinylmm.errors import ConfigError
from tinylmm.models.connectors.base import CONNECTORS

LAYER_NORM_EPS = 1e-12  # BERT's


class _Attention(nn.Module):
    """BERT attention plus its output block: softmax(q k^T / sqrt(d)) v, dense, dropout,
    LayerNorm(... + input). Keys and values from `kv_dim`-wide inputs."""

    def __init__(self, dim: int, kv_dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(dim, dim)
        self.key, self.value = nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, h, kv):
        B, M, D = h.shape

        def heads(t):  # [B, T, D] -> [B, H, T, D/H]
            return t.view(B, t.shape[1], self.heads, D // self.heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(self.query(h)), heads(self.key(kv)), heads(self.value(kv)))
        o = self.dense(o.transpose(1, 2).reshape(B, M, D))
        return self.norm(F.dropout(o, self.dropout, self.training) + h)


class _QFormerLayer(nn.Module):
    def __init__(self, dim: int, vision_dim: int, heads: int, ffn: int, dropout: float, cross: bool):
        super().__init__()
        self.dropout = dropout
        self.attention = _Attention(dim, dim, heads, dropout)
        self.crossattention = _Attention(dim, vision_dim, heads, dropout) if cross else None
        self.intermediate_query = nn.Linear(dim, ffn)
        self.output_query = nn.Linear(ffn, dim)
        self.output_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, h, features):
        h = self.attention(h, h)
        if self.crossattention is not None:
            h = self.crossattention(h, features)
        o = self.output_query(F.gelu(self.intermediate_query(h)))
        return self.output_norm(F.dropout(o, self.dropout, self.training) + h)


@dataclass
class QFormerOptions:
    """`model.connector` keys of `qformer`: M = num_queries tokens out, any number, any N."""

    num_queries: int = 128  # visual tokens per image (M): any number >= 1
    layers: int = 12  # BERT layers
    heads: int = 12
    hidden_size: int = 768  # the Q-Former's width (BERT-base's)
    intermediate_size: int = 3072  # its MLP's width
    cross_attention_every: int = 2  # layers 0, k, 2k ... cross-attend to the features
    dropout: float = 0.1  # BERT's hidden dropout, in training


@CONNECTORS.register("qformer")
class QFormerConnector(nn.Module):
    """BLIP-2-style Q-Former (TinyLLaVA's `qformer`): `num_queries` learned queries through
    `layers` BERT layers, cross-attending to the features every `cross_attention_every`
    layers, then a linear projector to the LLM width; M tokens out, any N. Random init."""

    Options = QFormerOptions
    tokens_out = "M = num_queries (any N)"

    def __init__(self, options: QFormerOptions, vision_dim: int, llm_dim: int):
        super().__init__()
        o = options
        for key in ("num_queries", "layers", "heads", "hidden_size", "intermediate_size", "cross_attention_every"):
            if getattr(o, key) < 1:
                raise ConfigError(f"model.connector.{key}={getattr(o, key)}: must be >= 1")
        if o.hidden_size % o.heads:
            raise ConfigError(
                f"model.connector.heads={o.heads} does not divide model.connector.hidden_size={o.hidden_size}"
            )
        if not 0 <= o.dropout < 1:
            raise ConfigError(f"model.connector.dropout={o.dropout}: must be in [0, 1)")
        self.num_queries, self.dropout = o.num_queries, o.dropout
        self.query_tokens = nn.Parameter(torch.randn(o.num_queries, o.hidden_size) * 0.02)  # BERT's init range
        self.layers = nn.ModuleList(
            _QFormerLayer(
                o.hidden_size, vision_dim, o.heads, o.intermediate_size, o.dropout, i % o.cross_attention_every == 0
            )
            for i in range(o.layers)
        )
        self.projector = nn.Linear(o.hidden_size, llm_dim)

    def output_len(self, num_patches: int) -> int:
        return self.num_queries

    def forward(self, x):
        # one copy of strided features (a tower's output may be) for every layer's keys and
        # values, where each linear layer would otherwise keep a copy of its own
        x = x.contiguous()
        q = self.query_tokens.expand(x.shape[0], -1, -1)
        h = F.dropout(F.layer_norm(q, q.shape[-1:], eps=LAYER_NORM_EPS), self.dropout, self.training)  # [B, M, h]
        for layer in self.layers:
            h = layer(h, x)
        return self.projector(h)  # [B, M, Dl]

    def trace(self, ctx):
        """The planner's replay of `forward` (tinylmm/memory/activations.py: ConnectorTrace),
        checked against torch's saved tensors by tests/test_connectors_attention.py."""
        patches, queries = ctx.tracer(ctx.tokens_in), ctx.tracer(ctx.tokens_out)
        qt = ctx.norm(self.query_tokens)
        q = ctx.tensor(self.query_tokens.shape[1], qt.wbytes, qt.trainable)
        h = queries.layernorm(q, qt)  # no weight: it keeps the parameter (not counted) and its statistics
        queries.saved.pop(id(q), None)
        h = queries.dropout(h, self.dropout)
        for layer in self.layers:
            h = _trace_attention(ctx, layer.attention, queries, queries, h, h)
            if layer.crossattention is not None:
                h = _trace_attention(ctx, layer.crossattention, queries, patches, h, ctx.x)
            g = queries.unary(queries.linear(h, ctx.lin(layer.intermediate_query)))  # gelu keeps its input
            o = queries.dropout(queries.linear(g, ctx.lin(layer.output_query)), self.dropout)
            h = queries.layernorm(queries.add(o, h), ctx.norm(layer.output_norm.weight))
        return queries.linear(h, ctx.lin(self.projector))


def _trace_attention(ctx, att: _Attention, queries, kv_tracer, h, kv):
    """One `_Attention` on the tracers: q, its output and logsumexp per query; k and v on the
    tracer of the tokens they come from (the queries', or the patches')."""
    q = queries.linear(h, ctx.lin(att.query))
    k, v = kv_tracer.linear(kv, ctx.lin(att.key)), kv_tracer.linear(kv, ctx.lin(att.value))
    if kv_tracer is queries:
        o = queries.sdpa(q, k, v, att.heads, repeat_kv=False, mask=False, eager=False)
    else:  # sdpa as Tracer.sdpa counts it, its keys and values saved per patch
        grad = q.grad or k.grad or v.grad
        if queries.ac:
            q, k, v = queries.cast(q, queries.c), kv_tracer.cast(k, queries.c), kv_tracer.cast(v, queries.c)
        o = ctx.tensor(q.n, q.b, grad)
        if grad:
            queries.save(q, o, ctx.tensor(att.heads, 4, False))
            kv_tracer.save(k, v)
    # sdpa's output is [B, M, H, Dh] in memory: merging the heads for dense is a view
    o = queries.dropout(queries.linear(o, ctx.lin(att.dense)), att.dropout)
    return queries.layernorm(queries.add(o, h), ctx.norm(att.norm.weight))
