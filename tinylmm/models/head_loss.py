"""The LM head and the cross-entropy, computed in chunks of supervised positions.

The logits are the largest tensors of a training step: at 1,319 supervised positions and
a 100k vocabulary, a micro-batch of 8 holds 10.5k x 100k fp32 logits, their log-softmax
and, in backward, two gradients of the same size (11.8 GiB). Peers avoid materialising
them: torchtune's chunked cross-entropy, Liger-Kernel's fused linear cross-entropy, Apple's
Cut Cross-Entropy. Here:

- `torch` (any device): `ChunkedHeadLoss`, a custom autograd function. Its forward runs
  the head and the loss `chunk` positions at a time under no_grad and keeps only the
  hidden states and targets; its backward runs each chunk again with autograd and
  returns the gradients of the hidden states and of the head's trainable parameters.
  So at most one chunk's logits are live, in forward and in backward, for any head
  module: plain, tied to the input embeddings, LoRA-wrapped or 4-bit (bitsandbytes).
  The cost is a second head matmul per chunk (the recomputation in backward).
- `liger` (CUDA, `pip install liger-kernel`): Liger's fused linear cross-entropy, used by
  `auto` where it is installed and the head is a plain linear layer (no adapters, no
  quantization); its Triton kernels compute the gradient during the forward, chunk by
  chunk.

The loss is the sum of -log softmax(head(h))[target] over the positions, as
`F.cross_entropy(..., reduction="sum")` computes it on the full logits; Gemma-2's final
logit soft-capping (cap * tanh(logits / cap)) is applied per chunk as its model applies it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = ("auto", "torch", "liger")


def _chunk_loss(head: nn.Module, h: torch.Tensor, t: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(h)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.float(), t, reduction="sum")


def _summed(head, hidden, targets, chunk, softcap) -> torch.Tensor:
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        total += _chunk_loss(head, hidden[s : s + chunk], targets[s : s + chunk], softcap)
    return total


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _replayed_rng(device: torch.device, state):
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state(state[1], device)
        yield


class ChunkedHeadLoss(torch.autograd.Function):
    """sum_i CE(head(hidden[i]), targets[i]) with one chunk of logits live at a time.

    `params` are the head's trainable parameters, passed so that autograd routes their
    gradients through this function (a tied head's weight is also the embedding's:
    autograd adds both contributions)."""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk, softcap, *params):
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.head, ctx.chunk, ctx.softcap, ctx.params = head, chunk, softcap, params
        ctx.save_for_backward(hidden, targets)
        ctx.rng = _rng_state(hidden.device)  # backward replays the forward's dropout (a LoRA head's)
        with torch.no_grad():
            return _summed(head, hidden, targets, chunk, softcap)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, targets = ctx.saved_tensors
        want_hidden = ctx.needs_input_grad[0]
        wanted = [p for p, needed in zip(ctx.params, ctx.needs_input_grad[5:]) if needed]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_wanted: list[torch.Tensor | None] = [None] * len(wanted)
        device, enabled, dtype = ctx.autocast
        with _replayed_rng(hidden.device, ctx.rng):
            for s in range(0, hidden.shape[0], ctx.chunk):
                h = hidden[s : s + ctx.chunk].detach().requires_grad_(want_hidden)
                with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                    loss = _chunk_loss(ctx.head, h, targets[s : s + ctx.chunk], ctx.softcap)
                inputs = ([h] if want_hidden else []) + wanted
                grads = torch.autograd.grad(loss, inputs, grad_loss, allow_unused=True)
                if want_hidden:
                    grad_hidden[s : s + ctx.chunk] = grads[0]
                    grads = grads[1:]
                for i, g in enumerate(grads):
                    if g is not None:
                        grad_wanted[i] = g if grad_wanted[i] is None else grad_wanted[i].add_(g)
        it = iter(grad_wanted)
        return (grad_hidden, None, None, None, None, *(next(it) if n else None for n in ctx.needs_input_grad[5:]))


def _chunked(head, hidden, targets, chunk, softcap):
    params = [p for p in head.parameters() if p.requires_grad]
    if not params and not hidden.requires_grad:  # evaluation, or nothing to differentiate
        with torch.no_grad():
            return _summed(head, hidden, targets, chunk, softcap)
    return ChunkedHeadLoss.apply(hidden, targets, head, chunk, softcap, *params)


def liger_available() -> bool:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except Exception:  # not installed, or its Triton import failed
        return False
    return True


def choose_kernel(kernel: str, head: nn.Module, device: torch.device) -> tuple[str, str]:
    """-> (kernel to run, a sentence for the log saying why)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown loss kernel '{kernel}' (known: {', '.join(KERNELS)})")
    if kernel == "torch":
        return "torch", "LM head + loss: chunked (torch)"
    plain = type(head) is nn.Linear
    why = None
    if device.type != "cuda":
        why = "Liger's kernels need CUDA"
    elif not plain:
        why = f"Liger needs a plain linear head, this one is {type(head).__name__} (adapters or quantization)"
    elif not liger_available():
        why = "liger-kernel is not installed (pip install 'tinylmm[liger]')"
    if why is None:
        return "liger", "LM head + loss: Liger-Kernel fused linear cross-entropy (CUDA)"
    if kernel == "liger":
        return "torch", f"LM head + loss: train.loss_kernel=liger asked, but {why}: chunked (torch) instead"
    return "torch", f"LM head + loss: chunked (torch; {why})"


def head_loss_sum(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk: int = 1024,
    kernel: str = "torch",
    softcap: float | None = None,
) -> torch.Tensor:
    """The summed cross-entropy of `head(hidden)` against `targets` ([P, D], [P]: only the
    supervised positions). `chunk` 0 runs every position at once (one logits tensor)."""
    if kernel == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        extra = {} if softcap is None else {"softcap": softcap}
        fn = LigerFusedLinearCrossEntropyLoss(reduction="sum", **extra)
        return fn(head.weight, hidden, targets, head.bias)
    if chunk <= 0 or chunk >= hidden.shape[0]:
        return _chunk_loss(head, hidden, targets, softcap)
    return _chunked(head, hidden, targets, chunk, softcap)
