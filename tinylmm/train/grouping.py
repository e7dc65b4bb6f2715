"""Length-grouped data order: `train.group_by_modality_length: true`, as LLaVA's and
TinyLLaVA's `group_by_modality_length` (LLaVA `llava/train/llava_trainer.py`,
`get_modality_length_grouped_indices`).

LLaVA's rule, followed here: samples with images and text-only samples are never mixed in
one global batch. Each modality is shuffled and cut into megabatches of one global batch
(per-device batch x processes x accumulation steps, the size LLaVA's trainer gives its
sampler); the megabatches are shuffled; the incomplete last megabatch of each modality is
joined into one mixed batch that goes last (here it fills at most one step of an epoch; the
rest falls in the incomplete batch that an epoch drops). The lengths are the samples' token
counts, visual tokens included (LLaVA counts words).

Where tinylmm differs: inside a megabatch LLaVA spreads the lengths evenly over the
devices' batches (`split_to_even_chunks`: equal work per device, a mix of lengths in every
batch); here a megabatch is sorted longest first, so each micro-batch is a band of similar
lengths and the padding of an unpacked micro-batch shrinks. A step's samples, and so its
loss, are the same either way. The order is a function of (seed, epoch) alone, drawn with
the same generator as the plain shuffle: a resumed run recomputes it and continues where
it stopped.
"""

from __future__ import annotations

import torch


class ModalityLengthGrouping:
    """The epoch orders of one stage; `lengths` signed as LLaVA's `modality_lengths`:
    positive for a sample with images, negative for a text-only one."""

    def __init__(self, lengths: list[int]):
        if any(n == 0 for n in lengths):
            raise ValueError("group_by_modality_length: a sample of length 0")
        signed = torch.tensor(lengths, dtype=torch.long)
        self.lengths = signed.abs()
        self.has_image = signed > 0
        self._cached: tuple[tuple, torch.Tensor] | None = None

    def epoch_order(self, generator: torch.Generator, megabatch: int, key: tuple[int, int]) -> torch.Tensor:
        """Every sample once, in megabatches of `megabatch` (cached per `key`: seed, epoch)."""
        key = (*key, megabatch)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        perm = torch.randperm(len(self.lengths), generator=generator)
        full, rest = [], []
        for part in (perm[self.has_image[perm]], perm[~self.has_image[perm]]):
            n_full = len(part) // megabatch * megabatch
            full += list(part[:n_full].split(megabatch))
            rest.append(part[n_full:])
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        tail = torch.cat(rest)
        order = torch.cat([self._longest_first(m) for m in shuffled] + [self._longest_first(tail)])
        self._cached = (key, order)
        return order

    def _longest_first(self, indices: torch.Tensor) -> torch.Tensor:
        return indices[torch.sort(self.lengths[indices], descending=True, stable=True).indices]
