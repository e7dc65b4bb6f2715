"""Activation memory of one stage: what autograd saves for backward, and what else is
alive at each moment of a micro-batch.

`stage_activations` walks the model as TinyLMM.forward runs it: the vision tower (one
image per sample), the connector, the LLM over `seq_len` tokens, then the LM head and the
loss over `logit_positions` positions per sample only. TinyLMM.forward runs the head only
where the next token is supervised, `train.loss_chunk` positions at a time
(tinylmm.models.head_loss); how many such positions a batch has depends on its data, so
it is an input here. The default is the most any batch can have
when every text token is supervised: seq_len minus the visual tokens of one image (the
image sits at the same place in every sample, where the template puts it).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from tinylmm.errors import ConfigError
from tinylmm.memory.arch import MetaModel
from tinylmm.memory.components import HALF, ComponentState, component_state
from tinylmm.memory.layers import MEASURED_LLMS, LayerView, decoder_layer, llm_dims
from tinylmm.memory.tracer import Linear, Norm, Sym, Tracer
from tinylmm.models.llm import decoder_layers
from tinylmm.schema import COMPONENTS, RunConfig


@dataclass
class StackActs:
    """A layer stack and what runs around it. Bytes per token unless said otherwise."""

    outside: float = 0.0  # saved outside the checkpointable layers (embedding, final norm ...)
    tail: float = 0.0  # the part of `outside` saved after the layers: freed before their backward
    layers: float = 0.0  # saved inside the layers, without checkpointing
    held: float = 0.0  # with checkpointing: the layer inputs the checkpoints keep
    per_layer: list = field(default_factory=list)  # (per token, fixed bytes) one layer saves, its input aside
    grads: float = 0.0  # per token: the gradients a layer's backward holds at once
    fixed_outside: float = 0.0  # bytes: autocast copies of weights outside the layers, saved for backward
    fixed_layers: float = 0.0  # bytes: the same inside the layers (dropped under checkpointing)
    cached: float = 0.0  # bytes: every autocast weight copy alive at the end of the forward

    def recompute(self, tokens: int) -> float:
        """With checkpointing: the largest layer's saved tensors, made again in backward."""
        return max((t * tokens + f for t, f in self.per_layer), default=0.0)


def _trace_stack(new_tracer, x: Sym, layers, run_layer) -> tuple[Sym, StackActs]:
    acts = StackActs()
    for layer in layers:
        tr = new_tracer()
        x_in = x
        x = run_layer(tr, x, layer)
        acts.fixed_layers += tr.fixed
        acts.cached += tr.cached
        acts.layers += tr.per_token()
        if x.grad:  # on the gradient path: a checkpoint keeps the layer's input
            acts.held += x_in.n * x_in.b
            acts.per_layer.append((tr.per_token(but=x_in), tr.fixed))
            # the gradient of the layer's output and, where the MLP's backward peaks, two
            # gradients of its widest intermediate (of gate and up; of fc1's output and gelu's)
            acts.grads = max(acts.grads, x.n * x.b + 2 * tr.widest)
    return x, acts


@dataclass
class Activations:
    """The activation memory of one stage, for any micro-batch, with or without checkpointing.

    The peak is the largest of these moments of a micro-batch:
      end of forward     every saved tensor, autocast's weight cache (a half copy of each
                         trainable fp32 weight), and while the loss runs the logits, their
                         fp32 copy and its log-softmax: of all positions, or of one chunk
      start of backward  every saved tensor and the loss's two logit-sized fp32 gradients
                         (nll's and log-softmax's); chunked: one chunk's logits made again,
                         their log-softmax and gradients (12 bytes per logit, measured), and
                         a trainable head's weight gradient of the chunk beside the sum
      backward of a layer  the gradients a layer's backward holds, with checkpointing
                         next to the layer's saved tensors made again; the LLM's while the
                         rest is still saved (the loss is done), the tower's once the LLM is
    The training loop keeps nothing of a micro-batch's output but its loss, so no logits
    outlive the backward.
    """

    llm: StackActs
    vision: StackActs
    connector: float  # per sample
    connector_fixed: float
    connector_cached: float
    loss: float  # per logit position, unchunked: head input (when the head trains), log-softmax output, target
    loss_chunked: float  # per logit position, chunked: the hidden state and target the loss function keeps
    loss_fixed: float  # per logit position: the gather's index (when the hidden states need a gradient)
    vocab: int  # logits per position; 0 when the loss needs no gradient
    logit_bytes: float  # bytes per logit (the head's compute dtype)
    llm_tokens: int  # per sample
    vision_tokens: int  # per sample (one image)
    logit_positions: int  # per sample
    notes: list[str] = field(default_factory=list)
    loss_chunk: int = 0  # positions per chunk of the head + loss (0: all at once)
    head_grad: float = 0.0  # bytes of a trainable head's fp32 weight gradient (0: the head is frozen)
    # autocast's half copy of a trainable fp32 head weight, saved for backward and cached in
    # forward; chunked, the forward runs without autograd and the backward makes it per chunk
    head_fixed: float = 0.0
    head_cached: float = 0.0
    hidden_grad: float = 0.0  # per logit position: the gradient of the hidden states, filled chunk by chunk

    def chunk_rows(self, batch: int) -> int:
        """Positions whose logits are live at once: a chunk, or all of the micro-batch."""
        rows = self.logit_positions * batch
        return rows if self.loss_chunk <= 0 or self.loss_chunk >= rows else self.loss_chunk

    def chunked(self, batch: int) -> bool:
        return self.chunk_rows(batch) < self.logit_positions * batch

    def fixed(self, gc: bool, batch: int) -> float:
        """Autocast's half copies of fp32 weights kept for backward. Inside checkpointed
        layers they are dropped after the forward and made again by the recomputation."""
        out = self.llm.fixed_outside + self.vision.fixed_outside + self.connector_fixed
        out += 0.0 if self.chunked(batch) else self.head_fixed
        return out if gc else out + self.llm.fixed_layers + self.vision.fixed_layers

    def cached(self, batch: int) -> float:
        head = 0.0 if self.chunked(batch) else self.head_cached
        return self.llm.cached + self.vision.cached + self.connector_cached + head

    def saved(self, batch: int, gc: bool) -> dict[str, float]:
        """What autograd keeps for backward at its start, by part; with checkpointing plus
        the one recomputed layer (what a saved_tensors_hook can count)."""
        tok_llm, tok_vis = self.llm_tokens * batch, self.vision_tokens * batch
        recompute = max(self.llm.recompute(tok_llm), self.vision.recompute(tok_vis)) if gc else 0.0
        return {
            "llm": (self.llm.outside + (self.llm.held if gc else self.llm.layers)) * tok_llm,
            "vision": (self.vision.outside + (self.vision.held if gc else self.vision.layers)) * tok_vis,
            "connector": self.connector * batch,
            "loss": ((self.loss_chunked if self.chunked(batch) else self.loss) + self.loss_fixed)
            * self.logit_positions
            * batch,
            "recompute": recompute,
            "fixed": self.fixed(gc, batch),
        }

    def moments(self, batch: int, gc: bool) -> dict[str, dict[str, float]]:
        part = self.saved(batch, gc)
        tok_llm, tok_vis = self.llm_tokens * batch, self.vision_tokens * batch
        logits = self.vocab * self.chunk_rows(batch)
        fp32_copy = 4 if self.logit_bytes != 4 else 0  # logits.float() is the tensor itself in fp32
        # chunked: the log-softmax of a chunk is made in forward and dropped (no_grad); in
        # backward one chunk's logits exist again with their gradients
        fwd_extra, bwd = (4, 12) if self.chunked(batch) else (0, 8)
        # with the hidden states' whole gradient (filled chunk by chunk), a trainable head's
        # gradient of the chunk beside the sum, and its half copy
        bwd_head = 0.0
        if self.chunked(batch) and self.vocab:
            bwd_head = self.head_grad + self.head_fixed + self.hidden_grad * self.logit_positions * batch
        llm = {"activations: LLM": part["llm"]}
        vision = {"activations: vision tower": part["vision"], "activations: connector": part["connector"]}
        copies = {"activations: autocast weight copies": part["fixed"]}
        out = {
            "end of forward": {
                **llm,
                **vision,
                "activations: logits + loss": part["loss"] + logits * (self.logit_bytes + fp32_copy + fwd_extra),
                "activations: autocast weight copies": self.cached(batch),
            },
            "start of backward": {
                **llm,
                **vision,
                "activations: logits + loss": part["loss"] + logits * bwd + bwd_head,
                **copies,
            },
        }
        # the loss and what ran after a stack (the LLM's final norm, the connector) are done
        llm_tail = {"activations: LLM": part["llm"] - self.llm.tail * tok_llm}
        tower = {"activations: vision tower": part["vision"]}
        for moment, stack, tokens, live in (
            ("backward of an LLM layer", self.llm, tok_llm, {**llm_tail, **vision}),
            ("backward of a vision layer", self.vision, tok_vis, tower),
        ):
            if stack.grads:
                out[moment] = {
                    **live,
                    **copies,
                    "activations: checkpoint recompute": stack.recompute(tokens) if gc else 0.0,
                    "activations: gradients in backward": stack.grads * tokens,
                }
        return out

    def rows(self, batch: int, gc: bool) -> tuple[str, dict[str, float]]:
        """(the peak moment, its activation rows)."""
        moments = self.moments(batch, gc)
        at = max(moments, key=lambda k: sum(moments[k].values()))
        keep = ("activations: LLM", "activations: vision tower")
        return at, {k: v for k, v in moments[at].items() if v or k in keep}


class ConnectorTrace:
    """What a connector's `trace` gets: the features it reads (`x`, per patch), tracers it
    asks for by token count, and how to describe its linear layers and tensors."""

    def __init__(self, x: Sym, new_tracer, wbytes, trains, tokens_in: int, tokens_out: int, notes: list[str]):
        self.x, self.tokens_in, self.tokens_out, self.notes = x, tokens_in, tokens_out, notes
        self._new, self._wbytes, self.trains = new_tracer, wbytes, trains
        self._tracers: list[tuple[Tracer, int]] = []

    def tracer(self, tokens: int) -> Tracer:
        """A tracer whose saves count `tokens` times per sample (patches in, visual tokens out ...)."""
        tr = self._new(tokens)()
        self._tracers.append((tr, tokens))
        return tr

    def lin(self, m) -> Linear:
        return Linear(m.in_features, m.out_features, self._wbytes(m.weight), self.trains(m.weight))

    def conv(self, m) -> Linear:
        """A convolution's weight for `Tracer.conv`: in x out elements (in: per output channel)."""
        inp = m.weight.numel() // m.out_channels
        return Linear(inp, m.out_channels, self._wbytes(m.weight), self.trains(m.weight))

    def norm(self, weight) -> Norm:
        """A norm's (or any per-channel parameter's) storage bytes and trainability."""
        return Norm(self._wbytes(weight), self.trains(weight))

    @staticmethod
    def tensor(n: float, b: float, grad: bool) -> Sym:
        return Sym(n, b, grad)

    def totals(self) -> tuple[float, float, float]:
        """(bytes saved per sample, autocast weight copies saved, autocast weight copies cached)."""
        return (
            sum(tr.per_token() * tokens for tr, tokens in self._tracers),
            sum(tr.fixed for tr, _ in self._tracers),
            sum(tr.cached for tr, _ in self._tracers),
        )


class TowerTrace:
    """What a vision tower's `trace` gets. The tower replays its forward: what runs before
    its blocks on `top`, then its blocks through `blocks`; every tracer counts its saves
    once per tower token (patches and prefix tokens). Towers use this by duck typing: the
    models package does not import the planner.

      top            the Tracer of what the tower saves outside its blocks
      autocast, eager  whether autocast runs; whether attention is eager
      wbytes(p), trains(p)  a parameter's storage bytes per element, whether it trains
      tensor(n, b, grad)    a new tensor (Sym), per token
      norm(weight)   a norm's (or any per-channel weight's) Norm
      view(layer)    a block's LayerView: its linear layers and norms by name
      blocks(x, run_block)  traces the blocks (`tower.layers`) on x, run_block(tr, x, view)
                     per block with a fresh tracer; returns the last block's output
    """

    def __init__(
        self, tower, new_tracer, state: ComponentState, cfg: RunConfig, half: int | None, *, autocast: bool, eager: bool
    ):
        self.top: Tracer = new_tracer()
        self.autocast, self.eager = autocast, eager
        self._tower, self._new, self._state, self._cfg, self._half = tower, new_tracer, state, cfg, half
        self._names = {id(m): n for n, m in tower.named_modules()}
        self._stack = StackActs()

    def wbytes(self, p) -> float:
        return self._state.bytes_per_element(p, self._half, self._cfg.quant.bits)

    def trains(self, p) -> bool:
        return self._state.trains(p)

    @staticmethod
    def tensor(n: float, b: float, grad: bool) -> Sym:
        return Sym(n, b, grad)

    def norm(self, weight) -> Norm:
        return Norm(self.wbytes(weight), self.trains(weight))

    def view(self, layer) -> LayerView:
        return LayerView(layer, self._names[id(layer)], self._state, self._cfg, self._half)

    def blocks(self, x: Sym, run_block) -> Sym:
        x, self._stack = _trace_stack(
            self._new, x, self._tower.layers, lambda tr, x, layer: run_block(tr, x, self.view(layer))
        )
        return x

    def acts(self) -> StackActs:
        """The tower's StackActs, once `trace` is done: its blocks', and outside them `top`'s saves."""
        acts = self._stack
        acts.outside, acts.fixed_outside = self.top.per_token(), self.top.fixed
        acts.cached += self.top.cached
        return acts


def default_logit_positions(meta: MetaModel, seq_len: int) -> int:
    """The most positions the LM head can run at in a batch of `seq_len` tokens: every text
    token supervised, the image's visual tokens never."""
    return max(1, seq_len - meta.num_image_tokens)


def _has_flash() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def stage_activations(
    meta: MetaModel,
    cfg: RunConfig,
    stage: str,
    *,
    seq_len: int,
    precision: str,
    device: str,
    logit_positions: int | None = None,
    states: dict[str, ComponentState] | None = None,
) -> Activations:
    """Every sample padded to `seq_len` tokens (a padding mask is materialised: the worst
    case), one image per sample, the LM head at `logit_positions` positions per sample
    (default: `default_logit_positions`)."""
    half = HALF.get(precision)
    autocast = half is not None
    cuda = device == "cuda"
    attn = cfg.train.attn_implementation
    eager = attn == "eager"
    mask = attn != "flash_attention_2" and not (attn == "auto" and cuda and _has_flash())
    states = states or {c: component_state(meta, cfg, stage, c) for c in COMPONENTS}
    M = meta.num_image_tokens
    if seq_len < M:
        raise ConfigError(
            f"stages.{stage}: a sequence of {seq_len} tokens cannot hold the {M} visual tokens of an image"
        )
    K = default_logit_positions(meta, seq_len) if logit_positions is None else logit_positions
    if not 1 <= K <= seq_len - 1:
        raise ConfigError(f"stages.{stage}: {K} logit positions; a sequence of {seq_len} tokens has 1 to {seq_len - 1}")
    notes: list[str] = []

    def tracer(seq):
        return lambda: Tracer(autocast=autocast, half=half or 4, cuda=cuda, seq=seq)

    def wbytes(state):
        return lambda p: state.bytes_per_element(p, half, cfg.quant.bits)

    # ---------------------------------------------------------------- vision tower
    # the tower replays its own forward on the tracers (its `trace`)
    vt, tok_v = meta.vision, meta.tower_tokens
    tower = TowerTrace(vt, tracer(tok_v), states["vision"], cfg, half, autocast=autocast, eager=eager)
    x = vt.trace(tower)
    v_acts = tower.acts()
    feats = x.like() if vt.drop_first else x  # h[:, 1:] is a view

    # ---------------------------------------------------------------- connector
    # the connector replays its own forward on the tracers (its `trace`)
    cs = states["connector"]
    ctx = ConnectorTrace(feats, tracer, wbytes(cs), cs.trains, vt.num_patches, M, notes)
    vis_out = meta.connector.trace(ctx)
    con_bytes, con_fixed, con_cached = ctx.totals()

    # ---------------------------------------------------------------- LLM
    ls = states["llm"]
    l_bytes = wbytes(ls)
    llm = meta.llm
    d = llm_dims(meta.llm_config)
    if meta.llm_config.model_type not in MEASURED_LLMS:
        notes.append(
            f"LLM model_type '{meta.llm_config.model_type}': activations estimated with the LLaMA layout "
            f"(measured: {', '.join(MEASURED_LLMS)})"
        )
    top = tracer(seq_len)()
    emb_w = llm.get_input_embeddings().weight
    if ls.trains(emb_w):
        top.save(Sym(1, 8, False))  # the token ids (int64), kept by the embedding
    e = Sym(meta.llm_config.hidden_size, l_bytes(emb_w), ls.trains(emb_w))
    if vis_out.grad or e.grad:
        top.save(Sym(1, 1, False))  # masked_scatter keeps the image-position mask
    x = Sym(e.n, e.b, e.grad or vis_out.grad)
    names = {id(m): n for n, m in llm.named_modules()}

    # a model without sdpa (Gemma-2) runs eager attention unless flash-attention takes over
    llm_eager = eager or (meta.llm_attention == "eager" and mask)

    def run_decoder(tr, x, layer):
        return decoder_layer(tr, x, LayerView(layer, names[id(layer)], ls, cfg, half), d, mask=mask, eager=llm_eager)

    x, l_acts = _trace_stack(tracer(seq_len), x, decoder_layers(meta.llm), run_decoder)
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm.model
    final = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None)
    fn = Norm(l_bytes(final.weight), ls.trains(final.weight))
    before = top.per_token()
    norm = {"phi": top.layernorm, "stablelm": top.layernorm, "gemma2": top.gemma_rmsnorm}.get(d.family, top.rmsnorm)
    x = norm(x, fn)
    l_acts.outside, l_acts.tail, l_acts.fixed_outside = top.per_token(), top.per_token() - before, top.fixed
    l_acts.cached += top.cached

    # ---------------------------------------------------------------- LM head and loss, K positions
    # hidden_states[:, keep] gathers a copy (the index is saved when it needs a gradient);
    # the loss is cross_entropy(logits.float()): log-softmax saves its fp32 output, nll its
    # int64 targets.
    htr = tracer(seq_len)()
    head = llm.get_output_embeddings()
    logits = htr.linear(
        x.like(), Linear(head.in_features, head.out_features, l_bytes(head.weight), ls.trains(head.weight))
    )
    head_copies = (htr.fixed, htr.cached)  # autocast's half copy of a trainable head: kept unless chunked
    loss = htr.per_token() + (4 * head.out_features + 8 if logits.grad else 0)
    if logits.grad and getattr(meta.llm_config, "final_logit_softcapping", None) is not None:
        loss += logits.b * head.out_features  # Gemma-2: cap * tanh(logits / cap), tanh keeps its output
    # chunked (tinylmm.models.head_loss): the function keeps the gathered hidden states and
    # the int64 targets; hidden[:, :-1][mask] keeps the mask's two int64 index vectors
    loss_chunked = x.n * x.b + 8 if logits.grad else 0
    index = 16 if x.grad else 0
    head_trains = ls.trains(head.weight)
    return Activations(
        l_acts,
        v_acts,
        con_bytes,
        con_fixed,
        con_cached,
        loss,
        loss_chunked,
        index,
        head.out_features if logits.grad else 0,
        logits.b,
        seq_len,
        tok_v,
        K,
        notes,
        cfg.train.loss_chunk,
        4 * head.in_features * head.out_features if head_trains else 0.0,
        *head_copies,
        x.n * x.b if x.grad else 0.0,
    )
