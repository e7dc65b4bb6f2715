"""The chunked LM head + loss equals the unchunked one (loss and gradients, fp32, 1e-6
relative), for plain, tied, LoRA and 4-bit heads, keeps one chunk of logits live, and is
what the training loop runs (train.loss_chunk, train.loss_kernel)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinylmm.config import ConfigError, resolve
from tinylmm.models.head_loss import choose_kernel, head_loss_sum

P, D, V = 37, 16, 50  # 37 positions: the last chunk is short


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(P, D, generator=g, dtype=torch.float64).float().requires_grad_(True)
    targets = torch.randint(0, V, (P,), generator=g)
    return hidden, targets


def _grads(head, hidden, targets, **kw):
    head.zero_grad(set_to_none=True)
    hidden.grad = None
    torch.manual_seed(123)  # the same dropout draws for both computations
    loss = head_loss_sum(head, hidden, targets, **kw)
    loss.backward()
    named = {n: p.grad.clone() for n, p in head.named_parameters() if p.requires_grad}
    return loss.detach(), hidden.grad.clone(), named


def _reference(head, hidden, targets, softcap=None):
    head.zero_grad(set_to_none=True)
    hidden.grad = None
    torch.manual_seed(123)
    logits = head(hidden)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    loss.backward()
    return (
        loss.detach(),
        hidden.grad.clone(),
        {n: p.grad.clone() for n, p in head.named_parameters() if p.requires_grad},
    )


def rel(a, b):
    """Relative difference of two tensors, by norm: summing per chunk changes the order of
    fp32 additions, so an element near zero can differ by more than 1e-6 of itself."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def _assert_same(got, want, tol=1e-6):
    (l1, h1, p1), (l0, h0, p0) = got, want
    assert rel(l1, l0) <= tol
    assert rel(h1, h0) <= tol
    assert p1.keys() == p0.keys() and p0
    for k in p0:
        assert rel(p1[k], p0[k]) <= tol, k


@pytest.mark.parametrize("chunk", [1, 8, 36])
def test_chunked_equals_unchunked_untied_head_with_bias(chunk):
    torch.manual_seed(0)
    head = nn.Linear(D, V, bias=True)  # Phi-2's head has a bias
    hidden, targets = _data()
    _assert_same(_grads(head, hidden, targets, chunk=chunk), _reference(head, hidden, targets))


def test_chunked_equals_unchunked_tied_head():
    """A tied head's weight is the input embedding's: the loss's gradient adds to the
    embedding's own."""
    torch.manual_seed(0)
    emb = nn.Embedding(V, D)
    head = nn.Linear(D, V, bias=False)
    head.weight = emb.weight
    ids = torch.randint(0, V, (P,))
    targets = torch.randint(0, V, (P,))

    def run(chunk):
        emb.zero_grad(set_to_none=True)
        hidden = emb(ids) * 1.5
        loss = head_loss_sum(head, hidden, targets, chunk=chunk) if chunk else None
        if loss is None:
            loss = F.cross_entropy(head(hidden), targets, reduction="sum")
        loss.backward()
        return loss.detach(), emb.weight.grad.clone()

    (l1, g1), (l0, g0) = run(5), run(None)
    assert rel(l1, l0) <= 1e-6 and rel(g1, g0) <= 1e-6


def test_chunked_equals_unchunked_lora_head_with_dropout():
    """Adapters on the head (peft), dropout on: the backward replays the forward's draws."""
    from peft import LoraConfig, get_peft_model

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(D, V, bias=False)

        def forward(self, x):
            return self.lm_head(x)

    torch.manual_seed(0)
    model = get_peft_model(Wrap(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["lm_head"]))
    nn.init.normal_(model.base_model.model.lm_head.lora_B["default"].weight)  # B = 0 at init: no gradient to A
    head = model.base_model.model.lm_head
    model.train()
    hidden, targets = _data(1)
    got, want = _grads(head, hidden, targets, chunk=8), _reference(head, hidden, targets)
    assert all("lora" in k for k in want[2])
    _assert_same(got, want)


def test_chunked_equals_unchunked_4bit_head():
    """A frozen bitsandbytes 4-bit head (QLoRA's base): only the hidden states get gradients."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(D * 4, V * 2, bias=False)
    head = bnb.nn.Linear4bit(D * 4, V * 2, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    head.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")
    head = head.to("cpu")
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(P, D * 4, generator=g).requires_grad_(True)
    targets = torch.randint(0, V * 2, (P,), generator=g)

    def run(chunk):
        hidden.grad = None
        loss = head_loss_sum(head, hidden, targets, chunk=chunk)
        loss.backward()
        return loss.detach(), hidden.grad.clone()

    (l1, g1), (l0, g0) = run(6), run(0)
    assert rel(l1, l0) <= 1e-6 and rel(g1, g0) <= 1e-6


def test_softcap_is_applied_per_chunk():
    torch.manual_seed(0)
    head = nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.mul_(20)  # logits well past the cap
    hidden, targets = _data()
    _assert_same(_grads(head, hidden, targets, chunk=7, softcap=3.0), _reference(head, hidden, targets, softcap=3.0))


def test_chunked_under_bf16_autocast_matches_unchunked():
    """The backward's recomputation runs under the forward's autocast."""
    torch.manual_seed(0)
    head = nn.Linear(D, V, bias=False)
    hidden, targets = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(head, hidden, targets, chunk=8)
        want = _reference(head, hidden, targets)
    # the hidden states' gradient is per position: equal; the weight's is a bf16 matmul
    # per chunk instead of one over all positions, rounded to bf16 per chunk
    assert rel(got[0], want[0]) <= 1e-6 and rel(got[1], want[1]) == 0
    assert rel(got[2]["weight"], want[2]["weight"]) <= 1e-2


def test_one_chunk_of_logits_is_live_at_a_time():
    """The peak of live tensor bytes over forward and backward grows with the chunk, not
    with the number of positions."""
    from tinylmm.train.measure import PeakTensorBytes

    torch.manual_seed(0)
    head = nn.Linear(64, 4096, bias=False)
    hidden = torch.randn(512, 64, requires_grad=True)
    targets = torch.randint(0, 4096, (512,))

    def peak(chunk):
        tracker = PeakTensorBytes()
        tracker.track([hidden, targets, head.weight])
        with tracker:
            head_loss_sum(head, hidden, targets, chunk=chunk).backward()
        head.weight.grad = hidden.grad = None
        return tracker.peak

    fixed = hidden.nbytes * 2 + targets.nbytes + head.weight.nbytes * 2  # inputs, weight, their grads
    full, chunked = peak(0) - fixed, peak(32) - fixed
    logits = 512 * 4096 * 4
    assert full > 2 * logits  # unchunked: logits and log-softmax (and their gradients) of all 512
    assert chunked < full / 8


def test_kernel_choice_and_its_note():
    head = nn.Linear(4, 8)
    assert choose_kernel("torch", head, torch.device("cpu"))[0] == "torch"
    kernel, note = choose_kernel("auto", head, torch.device("cpu"))
    assert kernel == "torch" and "need CUDA" in note
    kernel, note = choose_kernel("liger", head, torch.device("cpu"))
    assert kernel == "torch" and "liger asked" in note and "chunked (torch) instead" in note
    with pytest.raises(ValueError, match="unknown loss kernel 'ligr'"):
        choose_kernel("ligr", head, torch.device("cpu"))


def test_the_run_sets_the_chunk_and_reports_the_kernel():
    from tinylmm.models.assemble import build_model
    from tinylmm.train.runtime import configure_head_loss

    cfg, _ = resolve("toy", "share", ["train.loss_chunk=7", "train.loss_kernel=torch"])
    model, _ = build_model(cfg.model)
    note = configure_head_loss(model, cfg.train, torch.device("cpu"))
    assert (model.loss_chunk, model.loss_kernel) == (7, "torch")
    assert note == "LM head + loss: chunked (torch), 7 positions per chunk"
    with pytest.raises(ConfigError, match="train.loss_chunk=-1"):
        resolve("toy", "share", ["train.loss_chunk=-1"])


def test_the_planner_knows_where_adamw_is_fused():
    from tinylmm.memory.storage import FUSED_ADAMW_DEVICES
    from tinylmm.train.optim import FUSED_DEVICES, adamw_implementation

    assert FUSED_ADAMW_DEVICES == FUSED_DEVICES
    p = nn.Parameter(torch.zeros(3))
    assert adamw_implementation([{"params": [p]}], torch.device("cpu")) == "fused"
    assert adamw_implementation([{"params": [p]}], torch.device("meta")) == "fused"  # the params' device decides
    m = nn.Parameter(torch.zeros(3, device="meta"))
    assert adamw_implementation([{"params": [m]}], torch.device("cpu")) == "foreach"
