"""Sequence packing (tinylmm.data.packing) and length grouping (tinylmm.train.grouping)."""

import io
import json
import signal

import pytest
import torch
import transformers.masking_utils as masking_utils
from PIL import Image
from rich.console import Console
from test_train import EXPECTED

from tinylmm.config import resolve
from tinylmm.data.llava import LlavaDataset
from tinylmm.data.packing import collate_packed, collate_packed_items, token_counts
from tinylmm.data.shapes import write_shapes_dataset
from tinylmm.errors import ConfigError
from tinylmm.models.assemble import build_model
from tinylmm.models.packing_check import check_packing, packing_leak
from tinylmm.train.grouping import ModalityLengthGrouping
from tinylmm.train.loop import train
from tinylmm.train.schedule import StageSampler, micro_batches, stage_steps, step_indices

from conftest import TINY, tiny_stages


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The TINY model (LLaMA + SigLIP, sdpa) and 6 samples: 5 with an image, 1 text-only."""
    cfg, _ = resolve("toy", "share", TINY)
    model, proc = build_model(cfg.model, attn_implementation="sdpa")
    out = tmp_path_factory.mktemp("shapes")
    paths = write_shapes_dataset(out, seed=0, n_caption=4, n_instruct=8, n_eval=1, n_pope=1, image_size=32)
    data = LlavaDataset(paths["instruct"], paths["images"], proc, proc.template, 160)
    items = [data[i] for i in range(5)]
    text = proc.encode([("human", "What is a circle?"), ("gpt", "A round shape.")], num_images=0)
    items.insert(2, (text, []))
    return model, proc, data, items


def _loss_and_grads(model, batches, total_tokens):
    """Accumulated backward of sum(loss_sum) / total_tokens over `batches`, as the loop does."""
    model.zero_grad(set_to_none=True)
    loss = 0.0
    for batch in batches:
        out = model(**batch)
        (out.loss_sum / total_tokens).backward()
        loss += float(out.loss_sum.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss / total_tokens, grads


def test_packed_loss_and_gradients_equal_unpacked_with_accumulation(tiny):
    model, proc, _, items = tiny
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    # a sample whose first token is labelled: unpacked, no position predicts it; packed, the
    # previous sample's last position would, without the flattening collator's separator
    e, px = items[4]
    items = items[:4] + [(type(e)(e.input_ids, [e.input_ids[0], *e.labels[1:]], e.num_images), px)] + items[5:]
    unpacked = [collate_items(items, proc)]
    total = model(**unpacked[0]).num_tokens
    assert total > 0
    loss_u, grads_u = _loss_and_grads(model, unpacked, total)
    # the same samples as 2 packed micro-batches of 3, accumulated
    packed = [collate_packed_items(items[:3]), collate_packed_items(items[3:])]
    assert all(b["input_ids"].shape[0] == 1 and "attention_mask" not in b for b in packed)
    loss_p, grads_p = _loss_and_grads(model, packed, total)
    assert loss_p == pytest.approx(loss_u, abs=1e-5)
    assert set(grads_p) == set(grads_u) and any(n.startswith("vision.") for n in grads_u)
    for name, g in grads_u.items():
        torch.testing.assert_close(grads_p[name], g, atol=1e-5, rtol=1e-4, msg=name)


def collate_items(items, proc):
    from tinylmm.data.processor import collate

    return collate([e for e, _ in items], [px for _, pxs in items for px in pxs], proc.tokenizer.pad_token_id)


def test_packed_row_positions_labels_and_images(tiny):
    _, proc, _, items = tiny
    encoded = [e for e, _ in items[:3]]
    pixels = [px for _, pxs in items[:3] for px in pxs]
    batch = collate_packed(encoded, pixels)
    lengths = [len(e.input_ids) for e in encoded]
    starts = [sum(lengths[:i]) for i in range(3)]
    assert batch["input_ids"].shape == (1, sum(lengths))
    expected_positions = [p for n in lengths for p in range(n)]
    assert batch["position_ids"][0].tolist() == expected_positions
    assert batch["input_ids"][0].tolist() == [t for e in encoded for t in e.input_ids]
    labels = batch["labels"][0].tolist()
    assert all(labels[s] == -100 for s in starts)  # no sample's first token is predicted from the previous one
    labelled_first = collate_packed([encoded[0], type(encoded[1])([5, 6, 7], [5, 6, 7], 0)], pixels[:1])
    assert labelled_first["labels"][0, lengths[0] :].tolist() == [-100, 6, 7]
    for e, s in zip(encoded, starts):
        assert labels[s + 1 : s + len(e.labels)] == e.labels[1:]
    assert torch.equal(batch["pixel_values"], torch.stack(pixels))  # one per image, in sample order
    unpadded = collate_items(items[:3], proc)
    assert token_counts(batch) == (sum(lengths), sum(lengths))
    assert token_counts(unpadded) == (sum(lengths), 3 * max(lengths))


def _second_logits(model, proc, items, first_ids, first_pixels):
    (e0, _), (e1, px1) = items
    first = type(e0)(first_ids, e0.labels, e0.num_images)
    batch = collate_packed([first, e1], [first_pixels, *px1])
    del batch["labels"]  # logits at every position
    with torch.no_grad():
        return model(**batch).logits[0, len(first_ids) :]


def test_a_packed_sample_cannot_see_the_previous_one(tiny, monkeypatch):
    model, proc, _, items = tiny
    model.eval()
    pair = [items[0], items[1]]
    (e0, px0), (e1, px1) = pair
    changed = [t if t == proc.image_token_id else (t * 7 + 11) % 500 + 4 for t in e0.input_ids]
    other_image = proc.image_processor(Image.new("RGB", (32, 32), (250, 10, 10)))
    base = _second_logits(model, proc, pair, e0.input_ids, px0[0])
    moved = _second_logits(model, proc, pair, changed, other_image)
    torch.testing.assert_close(moved, base, atol=1e-5, rtol=1e-5)
    alone = collate_packed([e1], px1)
    del alone["labels"]
    with torch.no_grad():  # and the same as the sample alone
        alone = model(**alone).logits[0]
    torch.testing.assert_close(base, alone, atol=1e-5, rtol=1e-5)
    assert packing_leak(model.llm) < 1e-5
    check_packing(model.llm)
    # without transformers' packed-sequence detection the next sample does see the previous one
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert (_second_logits(model, proc, pair, changed, other_image) - base).abs().max() > 1e-3
    with pytest.raises(ConfigError, match=r"train.packing: the LLM \(LlamaForCausalLM, sdpa attention\) does not"):
        check_packing(model.llm)


def test_eager_attention_is_confined_too(monkeypatch):
    cfg, _ = resolve("toy", "share", TINY)
    model, _ = build_model(cfg.model, attn_implementation="eager")
    assert model.llm.config._attn_implementation == "eager"
    assert packing_leak(model.llm) < 1e-5
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert packing_leak(model.llm) > 0.1


def _lengths(n_image=37, n_text=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = (torch.randint(60, 2000, (n_image,), generator=g)).tolist()
    text = (-torch.randint(10, 1500, (n_text,), generator=g)).tolist()
    order = torch.randperm(n_image + n_text, generator=g).tolist()
    both = image + text
    return [both[i] for i in order]


def _steps(n, batch=8, micro=2, world=2, epochs=2.0):
    from tinylmm.schema import StageConfig

    return stage_steps(StageConfig(batch_size=batch, micro_batch_size=micro, epochs=epochs), n, world, "stages.t")


def test_grouping_is_deterministic_modality_pure_and_length_banded():
    lengths = _lengths()
    grouping = ModalityLengthGrouping(lengths)
    steps = _steps(len(lengths))
    order = [step_indices(steps, s, seed=5, grouping=grouping) for s in range(steps.total_steps)]
    again = [step_indices(steps, s, seed=5, grouping=ModalityLengthGrouping(lengths)) for s in range(steps.total_steps)]
    assert order == again
    assert order != [step_indices(steps, s, seed=6, grouping=grouping) for s in range(steps.total_steps)]
    assert order[: steps.steps_per_epoch] != order[steps.steps_per_epoch :]  # a fresh order each epoch
    # 37 image + 23 text samples in steps of 8: 4 + 2 full megabatches, the 4 + 7 left over go last
    full = (37 // 8) + (23 // 8)
    for epoch in range(2):
        steps_of_epoch = order[epoch * steps.steps_per_epoch : (epoch + 1) * steps.steps_per_epoch]
        assert len({i for s in steps_of_epoch for i in s}) == 8 * steps.steps_per_epoch  # no sample twice
        kinds = [{lengths[i] > 0 for i in s} for s in steps_of_epoch]
        assert all(len(k) == 1 for k in kinds[:full]), kinds  # modality-pure, as LLaVA's
        assert sum(k == {True} for k in kinds[:full]) == 4
        for s in steps_of_epoch[:full]:
            sizes = [abs(lengths[i]) for i in s]
            assert sizes == sorted(sizes, reverse=True)  # longest first: each micro-batch a length band
    # the plain shuffle mixes modalities in most steps of this data
    plain = [step_indices(steps, s, seed=5) for s in range(steps.total_steps)]
    assert sum(len({lengths[i] > 0 for i in s}) == 2 for s in plain) >= 3


def test_grouping_lowers_padding_of_unpacked_micro_batches():
    lengths = _lengths(n_image=200, n_text=0, seed=1)
    grouping = ModalityLengthGrouping(lengths)
    steps = _steps(len(lengths), batch=32, micro=4, world=1, epochs=1.0)

    def useful(group):
        real = padded = 0
        for s in range(steps.total_steps):
            for mb in micro_batches(steps, step_indices(steps, s, 0, group), 0):
                real += sum(lengths[i] for i in mb)
                padded += len(mb) * max(lengths[i] for i in mb)
        return real / padded

    assert useful(grouping) > useful(None) + 0.1


def test_a_resumed_sampler_continues_the_grouped_order():
    lengths = _lengths()
    steps = _steps(len(lengths))
    whole = list(StageSampler(steps, 3, rank=1, grouping=ModalityLengthGrouping(lengths)))
    resumed = list(StageSampler(steps, 3, rank=1, start_step=5, grouping=ModalityLengthGrouping(lengths)))
    assert resumed == whole[5 * steps.accumulation :] and len(whole) == steps.total_steps * steps.accumulation


def test_the_config_keys_are_checked():
    cfg, _ = resolve("toy", "share", ["train.packing=true", "train.group_by_modality_length=true"])
    assert cfg.train.packing is True and cfg.train.group_by_modality_length is True
    default, _ = resolve("toy", "share", [])
    assert default.train.packing is False and default.train.group_by_modality_length is False
    with pytest.raises(ConfigError, match="train.packing: expected true/false, got 'sometimes'"):
        resolve("toy", "share", ["train.packing=sometimes"])
    with pytest.raises(ConfigError, match=r"unknown key 'config.train.pack' \(did you mean 'packing'\?\)"):
        resolve("toy", "share", ["train.pack=true"])
    suggestion = r"unknown key 'config.train.group_by_length' \(did you mean 'group_by_modality_length'\?\)"
    with pytest.raises(ConfigError, match=suggestion):
        resolve("toy", "share", ["train.group_by_length=true"])


@pytest.mark.slow
def test_a_packed_run_gives_the_unpacked_losses_and_logs_useful_tokens(tmp_path):
    overrides = TINY + tiny_stages() + ["train.packing=true", "train.precision=fp32"]
    cfg, sources = resolve("toy", "share", overrides, output_dir=str(tmp_path / "run"))
    console = Console(file=io.StringIO(), width=200)
    result = train(cfg, sources, evaluate=False, console=console)
    for stage, losses in EXPECTED.items():  # the unpacked run's literal losses: packing changes no number
        assert result.losses[stage] == pytest.approx(losses, abs=1e-3), stage
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 9
    assert all(r["useful"] == 1.0 and r["positions"] == r["tokens"] > 0 for r in records)
    text = console.file.getvalue()
    assert "packing: each micro-batch in one row" in text
    assert "stage finetune: " in text and "(100.0% useful, 0 padding)" in text


@pytest.mark.slow
def test_grouping_in_the_loop_lowers_the_logged_padding(tmp_path):
    useful = {}
    for grouped in (False, True):
        overrides = TINY + tiny_stages(steps=2) + [f"train.group_by_modality_length={str(grouped).lower()}"]
        cfg, sources = resolve("toy", "share", overrides, output_dir=str(tmp_path / f"run-{grouped}"))
        train(cfg, sources, evaluate=False, console=Console(file=io.StringIO()))
        metrics = tmp_path / f"run-{grouped}" / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert all(r["useful"] == round(r["tokens"] / r["positions"], 4) for r in records)
        useful[grouped] = sum(r["tokens"] for r in records) / sum(r["positions"] for r in records)
    assert useful[False] < useful[True] < 1.0, useful


@pytest.mark.slow
def test_a_packed_grouped_run_resumes_to_the_same_losses(tmp_path, monkeypatch):
    from test_interrupts import _signal_at, losses_of

    from tinylmm.errors import RunInterrupted

    # 8 instruct samples in steps of 4 (2 micro-batches): the finetune stage crosses epochs
    overrides = TINY + tiny_stages(("pretrain", "finetune"), steps=4, batch=4, micro=2)
    overrides += ["shapes.n_instruct=8", "train.packing=true", "train.group_by_modality_length=true"]
    cfg, sources = resolve("toy", "base", overrides, output_dir=str(tmp_path / "ref"))
    train(cfg, sources, evaluate=False, console=Console(file=io.StringIO()))
    cfg, sources = resolve("toy", "base", overrides, output_dir=str(tmp_path / "run"))
    _signal_at(monkeypatch, "finetune", 3, signal.SIGTERM)
    with pytest.raises(RunInterrupted, match="stopped at stage 'finetune' step 3/4"):
        train(cfg, sources, evaluate=False, console=Console(file=io.StringIO()))
    monkeypatch.undo()
    train(resume_dir=tmp_path / "run", evaluate=False, console=Console(file=io.StringIO()))
    assert losses_of(tmp_path / "run") == losses_of(tmp_path / "ref")
