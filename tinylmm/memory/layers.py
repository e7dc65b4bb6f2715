"""The LLM blocks the planner knows, op by op as their forward code runs them: LLaMA-like
decoder layers (llama, mistral, qwen2; qwen3 with its per-head q/k norms), Gemma-2's
(four norms, soft-capped eager attention), StableLM's and Phi's. `LayerView` describes a
block's parts to the tracer, for these and for the towers' blocks, which their towers
trace themselves (`trace` in tinylmm/models/vision/hf.py and openclip.py)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tinylmm.errors import ConfigError
from tinylmm.memory.components import ComponentState
from tinylmm.memory.tracer import Linear, Norm, Sym, Tracer
from tinylmm.schema import RunConfig

# layouts checked against torch (bench/memory_check.py, tests/test_memory.py, tests/test_zoo.py)
MEASURED_LLMS = ("llama", "phi", "stablelm", "qwen2", "qwen3", "gemma2")
FAMILIES = ("phi", "stablelm", "gemma2")  # their own layouts; every other model_type is LLaMA-like


@dataclass
class LLMDims:
    family: str  # llama | phi | stablelm | gemma2
    heads: int
    kv_heads: int
    rotary_partial: bool
    resid_pdrop: float
    qk_norm: bool = False  # qwen3: RMSNorm over each head of q and k
    attn_softcap: bool = False  # gemma2: tanh soft-capping of the attention scores (eager only)


def llm_dims(config) -> LLMDims:
    mt = config.model_type
    heads = config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    partial = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)
    return LLMDims(
        mt if mt in FAMILIES else "llama",
        heads,
        getattr(config, "num_key_value_heads", None) or heads,
        partial < 1.0,
        float(getattr(config, "resid_pdrop", 0.0) or 0.0),
        qk_norm=mt == "qwen3",
        attn_softcap=getattr(config, "attn_logit_softcapping", None) is not None,
    )


class LayerView:
    """A block's linear layers and norms, by the module's own names, as the tracer needs them."""

    def __init__(self, block: nn.Module, prefix: str, state: ComponentState, cfg: RunConfig, half: int | None):
        self.block, self.prefix, self.state, self.cfg, self.half = block, prefix, state, cfg, half

    def get(self, name: str) -> nn.Module:
        """The block's submodule `name`; a block without it is a layout the planner does not know."""
        try:
            return self.block.get_submodule(name)
        except AttributeError:
            raise ConfigError(
                f"the memory planner does not know the layer layout of {type(self.block).__name__} (no '{name}'); "
                "it knows LLaMA-like (llama, mistral, qwen2, qwen3), Gemma-2, StableLM and Phi LLMs, CLIP, SigLIP "
                "and DINOv2 towers, open_clip's plain ViT blocks"
            ) from None

    def wbytes(self, p) -> float:
        return self.state.bytes_per_element(p, self.half, self.cfg.quant.bits)

    def lin(self, name: str) -> Linear:
        m = self.get(name)
        full = f"{self.prefix}.{name}" if self.prefix else name
        r = self.cfg.lora.r if full in self.state.lora else 0
        return Linear(
            m.in_features,
            m.out_features,
            self.wbytes(m.weight),
            self.state.trains(m.weight),
            id(m.weight) in self.state.quantized,
            r,
            self.state.lora_trainable and bool(r),
            self.cfg.lora.dropout,
        )

    def packed(self, name: str) -> Linear:
        """nn.MultiheadAttention's packed q/k/v projection (a weight, not a module); never adapted:
        peft's adapters on linear layers do not reach it."""
        m = self.get(name)
        w = m.in_proj_weight
        return Linear(w.shape[1], w.shape[0], self.wbytes(w), self.state.trains(w))

    def norm(self, name: str) -> Norm:
        m = self.get(name)
        return Norm(self.wbytes(m.weight), self.state.trains(m.weight))

    def scale(self, name: str) -> Norm:
        """A per-channel scale (DINOv2's LayerScale: the parameter `lambda1`)."""
        w = self.get(name).lambda1
        return Norm(self.wbytes(w), self.state.trains(w))


def decoder_layer(tr: Tracer, x: Sym, L: LayerView, d: LLMDims, *, mask: bool, eager: bool) -> Sym:
    repeat = d.kv_heads < d.heads and (mask or eager)
    # CPU sdpa writes a (b, heads, s, d) output when q was rebuilt by a partial-rotary
    # concatenation: o_proj then reads a transposed copy. CUDA kernels write (b, s, heads, d).
    out_copy = d.rotary_partial and not tr.cuda

    def attention(h: Sym, out_name: str) -> Sym:
        q, k, v = (tr.linear(h, L.lin(f"self_attn.{n}")) for n in ("q_proj", "k_proj", "v_proj"))
        if d.qk_norm:  # one rstd per token and head
            q = tr.rmsnorm(q, L.norm("self_attn.q_norm"), groups=d.heads)
            k = tr.rmsnorm(k, L.norm("self_attn.k_norm"), groups=d.kv_heads)
        # rotary embeddings: q * cos + rotate_half(q) * sin, new tensors that save nothing
        a = tr.sdpa(q.like(), k.like(), v, d.heads, repeat_kv=repeat, mask=mask, eager=eager, softcap=d.attn_softcap)
        return tr.linear(a.like() if out_copy else a, L.lin(f"self_attn.{out_name}"))

    if d.family == "phi":  # parallel block: one layer norm feeds attention and MLP
        h = tr.layernorm(x, L.norm("input_layernorm"))
        o = tr.dropout(attention(h, "dense"), d.resid_pdrop)
        m = tr.linear(tr.unary(tr.linear(h, L.lin("mlp.fc1")), saves=4), L.lin("mlp.fc2"))  # gelu_new
        return tr.add(tr.add(o, tr.dropout(m, d.resid_pdrop)), x)
    if d.family == "gemma2":  # norms around both sublayers; gelu(tanh) on the gate
        norm = tr.gemma_rmsnorm
        a = norm(attention(norm(x, L.norm("input_layernorm")), "o_proj"), L.norm("post_attention_layernorm"))
        x = tr.add(x, a)
        h = norm(x, L.norm("pre_feedforward_layernorm"))
        g = tr.unary(tr.linear(h, L.lin("mlp.gate_proj")))
        m = tr.linear(tr.mul(g, tr.linear(h, L.lin("mlp.up_proj"))), L.lin("mlp.down_proj"))
        return tr.add(x, norm(m, L.norm("post_feedforward_layernorm")))
    norm = tr.layernorm if d.family == "stablelm" else tr.rmsnorm
    x = tr.add(x, attention(norm(x, L.norm("input_layernorm")), "o_proj"))
    h = norm(x, L.norm("post_attention_layernorm"))
    g = tr.unary(tr.linear(h, L.lin("mlp.gate_proj")))  # silu saves its input
    p = tr.mul(g, tr.linear(h, L.lin("mlp.up_proj")))
    return tr.add(x, tr.linear(p, L.lin("mlp.down_proj")))
