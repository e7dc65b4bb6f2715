"""What autograd saves for backward, op by op, counted symbolically.

A `Sym` stands for one tensor of the forward pass, per token: elements, bytes per
element, whether it requires grad. The `Tracer` runs the ops a module's forward runs and
records what each saves; saving the same `Sym` twice counts once (one storage). The
rules, each checked against torch by tests/test_memory.py and bench/memory_check.py:

- a matmul saves its input when the weight trains, its weight when the input needs
  grad (a parameter, not an activation; but autocast's half copy of an fp32 weight is
  one, counted in `fixed`);
- autocast casts every matmul input to the half dtype: an fp32 input gets a new copy per
  matmul (q, k and v each keep one); norms and losses compute in fp32;
- a convolution saves its input and its weight whenever its output needs a gradient (one
  backward formula for both), so under autocast the half copy of an fp32 weight is saved;
- on CUDA, autocast runs layer_norm in fp32 (a cast copy of a half input) and dropout
  keeps a 1-byte mask; the CPU keeps the input dtype for both, and layer_norm's mean and
  rstd are fp32 where input or weight is (the CPU kernel's mixed-type rule);
- peft's LoRA layers cast their input to the adapter dtype (fp32), apply dropout, and
  lora_A / lora_B save their inputs; bitsandbytes k-bit layers save no activation;
- sdpa saves q, k, v, the output and a logsumexp; with a padding mask also the mask in
  the query dtype (one s x s copy per layer) and GQA keys and values repeated to all heads.
  Eager attention keeps the fp32 softmax and its cast copy (one tensor in fp32), plus
  the tanh of soft-capped scores (Gemma-2), and not its output.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class Sym:
    """A tensor, per token: `n` elements of `b` bytes; `grad`: requires grad."""

    n: float
    b: float
    grad: bool

    def like(self, b: float | None = None) -> Sym:
        """A new tensor of the same shape (an op's output, a copy)."""
        return Sym(self.n, self.b if b is None else b, self.grad)

    def split(self, parts: int) -> tuple[Sym, ...]:
        """`parts` equal views of this tensor across its features (q, k, v of a packed
        projection): tensors of their own to the tracer, each saved apart."""
        return tuple(Sym(self.n / parts, self.b, self.grad) for _ in range(parts))


@dataclass
class Linear:
    """A linear layer as the tracer needs it."""

    inp: int
    out: int
    wbytes: float  # storage bytes per weight element: 4, 2, or less when quantized
    trainable: bool
    quant: bool = False
    lora_r: int = 0
    lora_trainable: bool = False
    lora_dropout: float = 0.0


@dataclass
class Norm:
    """A norm's weight: storage bytes per element and trainability."""

    wbytes: float
    trainable: bool


class Tracer:
    def __init__(self, *, autocast: bool, half: int, cuda: bool, seq: int):
        self.ac, self.cuda, self.seq = autocast, cuda, seq
        self.c = half if autocast else 4  # bytes of a matmul's compute dtype
        self.saved: dict[int, tuple[Sym, float]] = {}  # id -> (tensor, bytes); the tensor pins the id
        self.fixed = 0.0  # bytes, not per token: autocast copies of fp32 weights saved for backward
        self.cached = 0.0  # bytes: autocast copies alive until the forward ends (its weight cache)
        self.widest = 0.0  # per token: the largest linear output on the gradient path (its gradient, in backward)

    def save(self, *ts: Sym | None):
        for t in ts:
            if t is not None:
                self.saved[id(t)] = (t, t.n * t.b)

    def per_token(self, but: Sym | None = None) -> float:
        return sum(b for k, (_, b) in self.saved.items() if but is None or k != id(but))

    def cast(self, x: Sym, b: float) -> Sym:
        return x if x.b == b else x.like(b)

    # -- ops

    def add(self, a: Sym, b: Sym) -> Sym:
        return Sym(a.n, max(a.b, b.b), a.grad or b.grad)

    def mul(self, a: Sym, b: Sym) -> Sym:
        if b.grad:
            self.save(a)
        if a.grad:
            self.save(b)
        return self.add(a, b)

    def scale(self, x: Sym, w: Norm) -> Sym:
        """x * w, w a per-channel parameter (LayerScale): x is saved when w trains; the product
        takes the wider dtype (a bf16 activation times an fp32 scale is fp32: no autocast here)."""
        if w.trainable:
            self.save(x)
        return Sym(x.n, max(x.b, w.wbytes), x.grad or w.trainable)

    def unary(self, x: Sym, saves: int = 1) -> Sym:
        """An elementwise op saving its input (silu, gelu) and `saves - 1` more of its size."""
        if x.grad:
            self.save(x, *(x.like() for _ in range(saves - 1)))
        return x.like()

    def dropout(self, x: Sym, p: float) -> Sym:
        if p <= 0:
            return x
        if x.grad:
            self.save(Sym(x.n, 1 if self.cuda else x.b, False))  # the mask
        return x.like()

    def linear(self, x: Sym, w: Linear) -> Sym:
        grad = x.grad or w.trainable or (bool(w.lora_r) and w.lora_trainable)
        if w.quant:  # bitsandbytes casts the input to its compute dtype and the output back
            y = Sym(w.out, x.b, grad)
        else:
            xin = self.cast(x, self.c) if self.ac else x
            if w.trainable:
                self.save(xin)
            if self.ac and w.wbytes == 4 and (x.grad or w.trainable):
                # autocast caches the half copy of an fp32 weight for the whole forward; the
                # copy is saved for backward when the input needs a gradient
                copy = self.c * w.inp * w.out
                self.cached += copy
                self.fixed += copy if x.grad else 0
            y = Sym(w.out, self.c if self.ac else x.b, grad)
        if w.lora_r:
            xl = self.cast(x, 4)  # peft: the input cast to the adapter dtype
            xd = self.dropout(xl, w.lora_dropout)
            xa = self.cast(xd, self.c) if self.ac else xd
            a = Sym(w.lora_r, self.c if self.ac else 4, xd.grad or w.lora_trainable)
            if w.lora_trainable:
                self.save(xa, a)
                if self.ac:
                    copies = self.c * w.lora_r * (w.inp + w.out)
                    self.fixed += copies
                    self.cached += copies
            y = self.add(y, Sym(w.out, a.b, a.grad))
        if y.grad:
            self.widest = max(self.widest, y.n * y.b)
        return y

    def conv(self, x: Sym, w: Linear) -> Sym:
        """A stride-1 convolution, per output position; `w.inp x w.out` its weight's elements."""
        grad = x.grad or w.trainable
        xin = self.cast(x, self.c) if self.ac else x
        if grad:
            self.save(xin)
            if self.ac and w.wbytes == 4:
                copy = self.c * w.inp * w.out
                self.cached += copy
                self.fixed += copy
        return Sym(w.out, self.c if self.ac else x.b, grad)

    def rmsnorm(self, x: Sym, w: Norm, groups: int = 1) -> Sym:
        """LlamaRMSNorm: x.float(); x * rsqrt(mean(x^2)); weight * normed.to(x.dtype).
        `groups`: rstds per token (Qwen3 normalises each attention head of q and k)."""
        if x.grad:
            self.save(self.cast(x, 4), Sym(groups, 4, False))
        normed = Sym(x.n, x.b, x.grad)
        if w.trainable:
            self.save(normed)
        return Sym(x.n, max(w.wbytes, x.b), x.grad or w.trainable)

    def gemma_rmsnorm(self, x: Sym, w: Norm) -> Sym:
        """Gemma2RMSNorm: normed = x.float() * rsqrt(...); (normed * (1 + w.float())).type_as(x):
        the product with the weight is in fp32, so its saved input is too."""
        if x.grad:
            self.save(self.cast(x, 4), Sym(1, 4, False))
        if w.trainable:
            self.save(Sym(x.n, 4, x.grad))
        return Sym(x.n, x.b, x.grad or w.trainable)

    def layernorm(self, x: Sym, w: Norm) -> Sym:
        fp32 = self.ac and self.cuda  # CUDA autocast runs layer_norm in fp32
        xin = self.cast(x, 4) if fp32 else x
        if x.grad or w.trainable:
            stats = 4 if self.cuda or xin.b == 4 or w.wbytes == 4 else xin.b
            self.save(xin, Sym(2, stats, False))  # input, mean, rstd
        return Sym(x.n, 4 if fp32 else (x.b if self.ac else 4), x.grad or w.trainable)

    def sdpa(
        self, q: Sym, k: Sym, v: Sym, heads: int, *, repeat_kv: bool, mask: bool, eager: bool, softcap: bool = False
    ) -> Sym:
        grad = q.grad or k.grad or v.grad
        if self.ac:
            q, k, v = self.cast(q, self.c), self.cast(k, self.c), self.cast(v, self.c)
        if repeat_kv:  # repeat_kv(): expand + reshape copies
            k, v = Sym(q.n, k.b, k.grad), Sym(q.n, v.b, v.grad)
        out = Sym(q.n, q.b, grad)
        if not grad:
            return out
        self.save(q, k, v)
        if not eager:  # the kernel keeps its output; eager's last matmul does not (o_proj may)
            self.save(out)
        if eager:  # softmax in fp32, cast back (the same tensor in fp32), both kept
            probs = Sym(heads * self.seq, 4, False)
            self.save(probs, self.cast(probs, q.b))
            if softcap:  # scores / cap, tanh, * cap: tanh keeps its output
                self.save(Sym(heads * self.seq, q.b, False))
        else:
            self.save(Sym(heads, 4, False))  # logsumexp
            if mask:
                self.save(Sym(self.seq, q.b, False))
        return out
