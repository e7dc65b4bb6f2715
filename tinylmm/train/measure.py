"""Measuring what the planner estimates, on the device at hand (the CPU here): used by
tests/test_memory.py and bench/memory_check.py to hold the planner to the truth.

    SavedTensors     the storages autograd saves for backward (saved_tensors_hooks)
    PeakTensorBytes  the peak of live tensor bytes over a region, op by op
    measure_saved    both counts for one forward, without and with checkpointing
    measure_peak     the peak over one optimizer step, run as the training loop runs it
    measure_storage  weights, gradients and optimizer states after one step
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tinylmm import trainability
from tinylmm.memory.plan import resolve_plan_precision
from tinylmm.models import adapters
from tinylmm.models.assemble import build_model
from tinylmm.models.llm import decoder_layers
from tinylmm.train.optim import build_optimizer
from tinylmm.train.runtime import configure_head_loss, enable_checkpointing
from tinylmm.train.stages import prepare_stage


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class SavedTensors:
    """Counts the distinct storages autograd saves for backward while active, leaving out
    parameters (and views of them: a saved weight is not an activation). Read the counts
    while the forward's output is alive: a storage saved by a graph node that nothing
    references (a frozen checkpointed layer's inputs) is freed at once and not counted.

    With non-reentrant activation checkpointing, torch packs the tensors saved inside a
    checkpointed layer with its own (innermost) saved_tensors_hooks, so this outer hook
    sees only what is saved outside the checkpointed layers. What a checkpoint really
    keeps is the layer's inputs (`held`, recorded by forward pre-hooks on `layers`), and
    in backward one layer's saved tensors exist again (recomputed): `by_layer` records, in
    a run *without* checkpointing, what each layer saves.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.ModuleList] | None = None):
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.params = {_key(p) for p in model.parameters()}
        self.refs: dict[int, object] = {}  # storage -> weak reference
        self.saved: dict[int, int] = {}
        self.by_layer: dict[str, dict[int, int]] = {}
        self.held: dict[int, int] = {}
        self.layer_inputs: dict[str, int] = {}
        self._current: str | None = None
        self._active = False
        self._handles = []
        for comp, stack in (layers or {}).items():
            for i, layer in enumerate(stack):
                self._handles.append(layer.register_forward_pre_hook(self._pre(f"{comp}.{i}"), with_kwargs=True))
                self._handles.append(layer.register_forward_hook(self._post))

    def _pre(self, label):
        def hook(module, args, kwargs):
            if not self._active:
                return
            x = args[0] if args else kwargs.get("hidden_states")
            self._current = label
            if isinstance(x, torch.Tensor):
                self.layer_inputs[label] = _key(x)
                if x.requires_grad or any(p.requires_grad for p in module.parameters()):
                    self.held[_key(x)] = x.untyped_storage().nbytes()

        return hook

    def _post(self, module, args, output):
        self._current = None

    def _pack(self, t: torch.Tensor):
        k = _key(t)
        n = t.untyped_storage().nbytes()
        if k not in self.params and n:
            self.refs[k] = self._ref(t.untyped_storage())
            self.saved[k] = n
            if self._current is not None:
                self.by_layer.setdefault(self._current, {})[k] = n
        return t

    def __enter__(self):
        self._active = True
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._active = False
        for h in self._handles:
            h.remove()

    @property
    def total(self) -> int:
        return sum(n for k, n in self.saved.items() if not self.refs[k].expired())

    def layer_bytes(self, label: str) -> int:
        """What one layer saves of its own: not its input (a checkpoint holds that anyway),
        not what other layers save too (rotary cos/sin: computed once, a shared input)."""
        inp = self.layer_inputs.get(label)
        others = {k for other, saved in self.by_layer.items() if other != label for k in saved}
        return sum(n for k, n in self.by_layer.get(label, {}).items() if k != inp and k not in others)

    def held_bytes(self) -> int:
        return sum(n for k, n in self.held.items() if k not in self.saved and k not in self.params)


class PeakTensorBytes:
    """The peak of live tensor bytes (distinct storages) over a region, op by op, on any
    device: a TorchDispatchMode sees every tensor an op creates, in backward and in
    checkpoint recomputation too; weak references tell when storages die. `track()` adds
    tensors that existed before (weights, optimizer states, the batch)."""

    def __init__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode

        self._ref = StorageWeakRef
        self.live: dict[int, tuple] = {}
        self.peak = 0
        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.track(torch.utils._pytree.tree_leaves(out))
                return out

        self._mode = _Mode()

    def track(self, tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                k = st.data_ptr()
                old = self.live.get(k)
                if st.nbytes() and (old is None or old[0].expired()):
                    self.live[k] = (self._ref(st), st.nbytes())
        for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[k]
        self.peak = max(self.peak, self.now)

    @property
    def now(self) -> int:
        return sum(n for _, n in self.live.values())

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of the bitsandbytes k-bit weights of `module`: packed values and quantization state."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and _key(t) not in seen:
            seen.add(_key(t))
            total += t.untyped_storage().nbytes()

    for p in module.parameters():
        qs = getattr(p, "quant_state", None)
        scb = getattr(p, "SCB", None)
        if qs is None and scb is None and p.dtype not in (torch.uint8, torch.int8):
            continue
        add(p)
        add(scb)
        if qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                add(t)
            if getattr(qs, "state2", None) is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
    return total


# --------------------------------------------------------------------------- a stage, as the loop runs it


def make_batch(model, B: int, S: int, pad: int = 7, seed: int = 0) -> dict:
    """B samples of S tokens: one image after a first token, every later token supervised,
    the last sample right-padded (the attention mask is then materialised, as planned)."""
    M = model.num_image_tokens
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 480, (B, S), generator=g)
    ids[:, 1 : 1 + M] = model.image_token_id
    labels = ids.clone()
    labels[:, : 1 + M] = -100
    mask = torch.ones(B, S, dtype=torch.long)
    mask[-1, -pad:] = 0
    labels[-1, -pad:] = -100
    ids[-1, -pad:] = 3
    size = model.vision.image_size
    return dict(
        input_ids=ids, attention_mask=mask, pixel_values=torch.randn(B, 3, size, size, generator=g), labels=labels
    )


def logit_positions(batch: dict) -> int:
    """Where TinyLMM.forward runs the LM head for this batch, per sample: the positions whose
    next token is supervised, over the samples (rounded up; at least one)."""
    n, b = int((batch["labels"][:, 1:] != -100).sum()), batch["labels"].shape[0]
    return max(1, -(-n // b))


def stage_model(cfg, stage: str, run_dir, precision: str):
    """The model as the training loop prepares it for `stage`: adapters, a 4-bit base,
    frozen weights in bf16 under mixed precision."""
    model, _ = build_model(cfg.model)
    half = torch.bfloat16 if precision == "bf16" else None
    prepare_stage(model, cfg, stage, Path(run_dir), device="cpu", half_dtype=half)
    configure_head_loss(model, cfg.train, torch.device("cpu"))
    return model.train()


def _llm(model):
    return model.llm.get_base_model() if adapters.is_peft(model.llm) else model.llm


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def measure_saved(model, batch: dict, precision: str) -> tuple[int, int]:
    """Bytes saved for backward by one forward, (without, with) checkpointing. Without:
    every storage the hook sees. With: what the hook sees (outside the layers, and the
    layers' inputs, which the checkpoints save through an autograd function of their own)
    plus the largest layer's saved tensors, measured in the first run, which exist again
    when that layer is recomputed. Enables checkpointing on `model`."""
    layers = {"llm": decoder_layers(_llm(model)), "vision": model.vision.layers}
    with SavedTensors(model, layers) as plain, autocast(precision):
        out = model(**batch)
    without, largest_layer = plain.total, max((plain.layer_bytes(k) for k in plain.by_layer), default=0)
    del out
    enable_checkpointing(model)
    with SavedTensors(model, layers) as ck, autocast(precision):
        _out = model(**batch)  # kept alive while the hooks count
    return without, ck.total + ck.held_bytes() + largest_layer


def measure_tower_saved(model, pixel_values: torch.Tensor, precision: str) -> tuple[int, int]:
    """What the vision tower alone saves for backward, (without, with) checkpointing, counted
    as `measure_saved` counts the whole model. Enables checkpointing on `model`."""
    tower = model.vision
    with SavedTensors(tower, {"vision": tower.layers}) as plain, autocast(precision):
        out = tower(pixel_values)
    without, largest = plain.total, max((plain.layer_bytes(k) for k in plain.by_layer), default=0)
    del out
    enable_checkpointing(model)
    with SavedTensors(tower, {"vision": tower.layers}) as ck, autocast(precision):
        _out = tower(pixel_values)  # kept alive while the hooks count
    return without, ck.total + ck.held_bytes() + largest


def measure_peak(cfg, stage: str, batch_size: int, seq_len: int, run_dir, micro_batches: int = 2) -> tuple[int, int]:
    """(peak, logit positions): the peak of live tensor bytes over one optimizer step of
    `micro_batches` accumulated micro-batches, run as tinylmm.train.loop runs it (nothing
    of a micro-batch's output is kept but its loss), after a first step made the optimizer
    states. Weights, optimizer states and the batch count from the start."""
    precision = resolve_plan_precision(cfg.train.precision, "cpu")
    model = stage_model(cfg, stage, run_dir, precision)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model)
    opt, _ = build_optimizer(
        trainability.param_groups(model, cfg.stages[stage]), cfg.train.optimizer, torch.device("cpu")
    )
    batch = make_batch(model, batch_size, seq_len)

    def step():
        loss_sum = torch.zeros(())
        for _ in range(micro_batches):
            with autocast(precision):
                micro_loss = model(**batch).loss_sum
            micro_loss.backward()
            loss_sum += micro_loss.detach().float()
            del micro_loss
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    tracker = PeakTensorBytes()
    tracker.track(list(model.parameters()) + list(model.buffers()) + list(batch.values()))
    tracker.track([t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)])
    with tracker:
        step()
    return tracker.peak, logit_positions(batch)


def measure_storage(model, optimizer, step) -> tuple[dict, int, int]:
    """After `step()` (forward and backward) and an optimizer step: parameter bytes by dtype,
    gradient bytes, optimizer state bytes (distinct storages)."""
    step()
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    optimizer.step()
    seen, states = set(), 0
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor) and _key(t) not in seen:
                seen.add(_key(t))
                states += t.untyped_storage().nbytes()
    by_dtype: dict = {}
    for p in model.parameters():
        by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + p.nbytes
    return by_dtype, grads, states
