"""The combined model: vision tower -> connector -> visual tokens scattered into the
`<image>` positions of the LLM's input embeddings. Built by tinylmm.models.assemble, saved
in the format of tinylmm.models.checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tinylmm.data.templates import IGNORE_INDEX
from tinylmm.models import checkpoint
from tinylmm.models.head_loss import head_loss_sum
from tinylmm.models.llm import decoder_layers
from tinylmm.schema import ModelSpec


@dataclass
class LMMOutput:
    logits: torch.Tensor | None  # None with labels: the head ran only inside the loss
    loss: torch.Tensor | None = None  # mean over supervised tokens
    loss_sum: torch.Tensor | None = None  # sum over supervised tokens (for token-weighted steps)
    num_tokens: int = 0


class TinyLMM(nn.Module):
    def __init__(self, vision: nn.Module, connector: nn.Module, llm: nn.Module, image_token_id: int, spec: ModelSpec):
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id
        self.spec = spec
        self.num_image_tokens = connector.output_len(vision.num_patches)
        self.llm_base: Path | None = None  # full-precision base under LLM adapters
        self.llm_quant = None  # QuantSpec of a k-bit LLM base
        self.vision_lora = None  # LoraSpec of adapters injected in the vision tower
        self.notes: list[str] = []  # what the assembly decided (embedding grown ...)
        # the LM head + loss (tinylmm.models.head_loss): positions per chunk, and the kernel
        # that the run chose (set by the training loop from train.loss_chunk / loss_kernel)
        self.loss_chunk = 1024
        self.loss_kernel = "torch"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def layer_stack(self, component: str) -> nn.ModuleList | None:
        """The layers `partial:N` counts in: the tower's blocks, the LLM's decoder layers
        (the connector has none)."""
        if component == "vision":
            return self.vision.layers
        if component == "llm":
            return decoder_layers(self.llm)
        return None

    @property
    def _no_split_modules(self) -> list[str]:
        """The class names of the tower's blocks and the LLM's decoder layers, as transformers'
        models list theirs: accelerate's FSDP TRANSFORMER_BASED_WRAP shards each such layer
        apart (tinylmm's fsdp2.yaml); without it the whole model would be one shard group."""
        stacks = [self.layer_stack("vision"), self.layer_stack("llm")]
        return sorted({type(layer).__name__ for stack in stacks if stack is not None for layer in stack})

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] -> [n_images, M, D_llm]"""
        return self.connector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        is_image = input_ids == self.image_token_id
        # The <image> row is never read (its positions take the visual tokens), so an
        # imported model keeps its vocabulary even where `<image>` lies past its table.
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        n_positions = int(is_image.sum())
        if pixel_values is None or pixel_values.numel() == 0:
            if n_positions:
                raise ValueError(f"{n_positions} <image> positions but no pixel_values")
            return embeds
        visual = self.encode_images(pixel_values).to(embeds.dtype)
        if visual.shape[0] * visual.shape[1] != n_positions:
            raise ValueError(
                f"{n_positions} <image> positions for {visual.shape[0]} image(s) x {visual.shape[1]} tokens"
            )
        # Row-major order: the k-th image of the batch fills the k-th run of <image> positions.
        return embeds.masked_scatter(is_image.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, position_ids=None) -> LMMOutput:
        """Without labels: logits at every position. With labels: the loss only. The head
        runs on the supervised positions alone, `loss_chunk` of them at a time
        (tinylmm.models.head_loss): with a 100k vocabulary the logits would be the largest
        tensors of a step. A packed row (tinylmm.data.packing) has `position_ids` restarting
        per sample and no attention_mask: transformers confines attention to each sample."""
        embeds = self.embed(input_ids, pixel_values)
        kw = dict(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if labels is None:
            return LMMOutput(self.llm(**kw).logits)
        hidden = self.llm.get_decoder()(**kw).last_hidden_state
        targets = labels[:, 1:]  # the hidden state at position t predicts token t + 1
        supervised = targets != IGNORE_INDEX
        loss_sum = head_loss_sum(
            self.llm.get_output_embeddings(),
            hidden[:, :-1][supervised],
            targets[supervised],
            chunk=self.loss_chunk,
            kernel=self.loss_kernel,
            softcap=getattr(self.llm.config, "final_logit_softcapping", None),
        )
        n = int(supervised.sum())
        return LMMOutput(None, loss_sum / max(n, 1), loss_sum, n)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, *, use_cache: bool = True, **kwargs):
        """Greedy by default; returns only the new tokens. Position ids come from the attention
        mask (transformers' `attention_mask.cumsum(-1) - 1`), so a left-padded row counts from
        its first real token.

        use_cache=True: the LLM's KV cache, generating from the spliced embeddings.
        use_cache=False: every step recomputes the whole sequence. transformers forces the cache
        for embeddings ("decoder-only models with inputs_embeds forwarding must use caching",
        generation/utils.py), so this path generates from the token ids and, as transformers'
        LLaVA re-runs its splice at every uncached step, the embedding layer's output takes the
        spliced prompt at the prompt's positions (the images are encoded once)."""
        input_ids = input_ids.to(self.device)
        embeds = self.embed(input_ids, None if pixel_values is None else pixel_values.to(self.device))
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        kwargs.setdefault("do_sample", False)
        pad = self.llm.config.pad_token_id
        if pad is None:  # Llama-3.x configs list several eos ids and no pad
            eos = self.llm.config.eos_token_id
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        kwargs.setdefault("pad_token_id", pad)
        if use_cache:
            return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        n = input_ids.shape[1]

        def splice(module, args, output):
            if output.shape[1] < n:
                raise RuntimeError(f"uncached step embedded {output.shape[1]} positions, fewer than the prompt's {n}")
            return torch.cat([embeds.to(output.dtype), output[:, n:]], dim=1)

        ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)  # <image> may lie past the table
        hook = self.llm.get_input_embeddings().register_forward_hook(splice)
        try:
            out = self.llm.generate(input_ids=ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        finally:
            hook.remove()
        return out[:, n:]

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path, processor) -> None:
        """Write a checkpoint directory (tinylmm.models.checkpoint) that `tinylmm.load` reads."""
        checkpoint.save(self, directory, processor)
