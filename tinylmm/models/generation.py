"""Answering: batched generation (`tinylmm.generate`, eval, the server) and streamed chat.

Batches are left-padded, as transformers' docs ask of decoder-only models ("decoder-only
models must use left-padding for batched generation", GenerationMixin.generate): every prompt
ends at the last column, so each row's next token is read at the same place, and the padding
is masked out of attention and of the position ids (TinyLMM.generate). `generate_tokens` is the
one batched call: `generate_batch` (eval) and the server's batcher (serve/batcher.py) go through it.
"""

from __future__ import annotations

import torch

from tinylmm.data.processor import Processor, SampleError
from tinylmm.errors import ConfigError
from tinylmm.models.prompts import prompt_inputs


def left_pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, n_i] token ids -> ([batch, max n], attention mask), each row right-aligned."""
    length = max(r.shape[-1] for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, r in enumerate(rows):
        n = r.shape[-1]
        ids[row, length - n :] = r.reshape(-1)
        mask[row, length - n :] = 1
    return ids, mask


@torch.no_grad()
def generate_tokens(model, processor: Processor, encoded: list[dict], **kwargs) -> torch.Tensor:
    """encoded: `processor.prompt(...)` per row (input_ids [1, n], pixel_values where it has
    images) -> the new tokens [batch, steps], rows ended early filled with the pad id."""
    pad = processor.tokenizer.pad_token_id
    ids, mask = left_pad([e["input_ids"] for e in encoded], pad)
    pixels = [e["pixel_values"] for e in encoded if e.get("pixel_values") is not None]
    kwargs.setdefault("eos_token_id", processor.stop_token_ids)
    kwargs.setdefault("pad_token_id", pad)
    return model.generate(ids, attention_mask=mask, pixel_values=torch.cat(pixels) if pixels else None, **kwargs)


def decode(processor: Processor, tokens: torch.Tensor) -> list[str]:
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens]


def generate_batch(
    model, processor: Processor, conversations, images, *, max_new_tokens: int = 32, **kwargs
) -> list[str]:
    """conversations: one [(role, text) ...] per sample, ending with a human turn;
    images: one list of PIL images per sample. One left-padded batch."""
    encoded = [processor.prompt(c, imgs) for c, imgs in zip(conversations, images)]
    return decode(processor, generate_tokens(model, processor, encoded, max_new_tokens=max_new_tokens, **kwargs))


def generate(
    model,
    processor: Processor,
    prompts,
    images=None,
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    use_cache: bool = True,
    **kwargs,
) -> list[str]:
    """`tinylmm.generate`: one answer per prompt, `batch_size` prompts per left-padded batch,
    greedy unless generation kwargs say otherwise (do_sample, temperature, top_p ... go to
    transformers' generate). See tinylmm.models.prompts for what `prompts` and `images` take."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    conversations, pictures = prompt_inputs(prompts, images)
    encoded = []
    for i, (conv, imgs) in enumerate(zip(conversations, pictures)):
        try:
            encoded.append(processor.prompt(conv, imgs))
        except SampleError as e:
            raise ConfigError(f"prompt {i}: {e}") from None
    was_training = model.training
    model.eval()  # dropout off: the answers do not depend on the batch
    try:
        answers = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            tokens = generate_tokens(
                model, processor, chunk, max_new_tokens=max_new_tokens, use_cache=use_cache, **kwargs
            )
            answers += decode(processor, tokens)
    finally:
        model.train(was_training)
    return answers


class CallbackStreamer:
    """A transformers streamer that hands each newly decoded piece of text to `on_text`."""

    def __init__(self, tokenizer, on_text):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.printed = 0
        self.first = True

    def put(self, value):
        if self.first:  # generate() first sends the prompt (here: nothing, embeds only)
            self.first = False
            if value.dim() > 1 or value.numel() != 1:
                return
        self.ids.extend(value.reshape(-1).tolist())
        text = self._text()
        if not text.endswith("\ufffd"):  # wait for complete multi-byte characters
            self.on_text(text[self.printed :])
            self.printed = len(text)

    def _text(self) -> str:
        # TinyLLaVA's prompts end in "ASSISTANT:" (no space), so answers start with one.
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

    def end(self):
        text = self._text()
        if len(text) > self.printed:
            self.on_text(text[self.printed :])


def chat_reply(model, processor: Processor, turns, images, *, on_text=None, max_new_tokens: int = 256, **kwargs) -> str:
    """One assistant reply to the conversation so far, streamed to `on_text` piece by piece."""
    batch = processor.prompt(turns, images)
    streamer = CallbackStreamer(processor.tokenizer, on_text) if on_text else None
    out = model.generate(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch.get("pixel_values"),
        max_new_tokens=max_new_tokens,
        eos_token_id=processor.stop_token_ids,
        pad_token_id=processor.tokenizer.pad_token_id,
        streamer=streamer,
        **kwargs,
    )
    return processor.tokenizer.decode(out[0], skip_special_tokens=True).strip()
