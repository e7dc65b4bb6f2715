"""Sequence packing: a micro-batch's samples in one row, each attending only to itself.

`train.packing: true` (off by default, so that the default run and its measured results
stay as they are). Off, `collate` right-pads the samples into rows of the longest one.
On, `collate_packed` lays them end to end in a single row with transformers'
`DataCollatorWithFlattening` ("concatenates the entire mini batch into single long
sequence ... no padding will be added, returns input_ids, labels and position_ids"):

- `position_ids` restart at 0 at each sample, and no `attention_mask` is passed. That is
  the signal transformers reads: `masking_utils.find_packed_sequence_indices` ("what
  separate different sequences is when 2 consecutive positions_ids are separated by more
  than 1"), used only "if the 2D attention mask is explicitly None", turns the causal mask
  into a block-diagonal causal one for sdpa and eager; flash-attention-2 takes the same
  position ids to `flash_attn_varlen_func` (`_is_packed_sequence`, batch size 1 only: hence
  one row). The flash-attention path is GPU-only and was not run here (no GPU, no
  flash-attn); on a CPU `train.attn_implementation` never selects it.
- The first label of every sample is -100 (the flattening collator's `separator_id`): the
  loss at position t predicts token t + 1, and a sample's first token must not be
  predicted from the previous sample's last one. The unpacked loss never reads that label
  either, so both sum the same supervised tokens; the loop's mean over the supervised
  tokens of the global batch and its gradient accumulation are unchanged.
- Images stay per image: `pixel_values` are the images in sample order, which is the
  row-major order of the `<image>` runs that TinyLMM fills.

With the toy's LLaMA on transformers 5.24, a row is confined per sample (tests/test_packing.py
changes the previous sample and checks the next one's logits do not move); an LLM whose
masking ignores position ids would leak, which tinylmm.models.packing_check refuses before a
packed stage trains.
"""

from __future__ import annotations

import torch
from transformers import DataCollatorWithFlattening

from tinylmm.data.processor import Encoded
from tinylmm.data.templates import IGNORE_INDEX


def collate_packed(encoded: list[Encoded], pixel_values: list[torch.Tensor]) -> dict:
    """One row [1, sum of lengths]: input_ids, labels, position_ids (restarting per sample),
    by transformers' own DataCollatorWithFlattening; the images as they come."""
    flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    batch = dict(flatten([{"input_ids": e.input_ids, "labels": e.labels} for e in encoded], return_tensors="pt"))
    if pixel_values:
        batch["pixel_values"] = torch.stack(pixel_values)
    return batch


def collate_packed_items(items) -> dict:
    """`collate_packed` for a LlavaDataset's items: (Encoded, [image tensors]) each."""
    return collate_packed([e for e, _ in items], [px for _, pxs in items for px in pxs])


def token_counts(batch: dict) -> tuple[int, int]:
    """-> (useful tokens, positions computed): the real tokens of a batch and all its
    positions, padding included (a packed row has none)."""
    positions = batch["input_ids"].numel()
    mask = batch.get("attention_mask")
    return (int(mask.sum()) if mask is not None else positions), positions


def packing_note(attn_implementation: str) -> str:
    """What packing costs under the attention the LLM runs, for the run's log."""
    note = "packing: each micro-batch in one row, attention confined to each sample"
    if attn_implementation == "flash_attention_2":
        return note + " (flash-attention-2 varlen from the position ids)"
    return note + (
        f" ({attn_implementation}: a dense block-diagonal mask, so attention computes the whole row's square; "
        "only flash_attention_2 (GPU) skips the other samples: bench/README.md 'Packing')"
    )
