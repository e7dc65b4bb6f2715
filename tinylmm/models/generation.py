"""Answering: batched greedy generation (eval) and streamed chat."""

from __future__ import annotations

import torch

from tinylmm.data.processor import Processor


@torch.no_grad()
def generate_batch(
    model, processor: Processor, conversations, images, *, max_new_tokens: int = 32, **kwargs
) -> list[str]:
    """conversations: one [(role, text) ...] per sample, ending with a human turn;
    images: one list of PIL images per sample. Left-padded so all prompts end together."""
    encoded = [processor.prompt(c, imgs) for c, imgs in zip(conversations, images)]
    length = max(e["input_ids"].shape[1] for e in encoded)
    pad = processor.tokenizer.pad_token_id
    ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = e["input_ids"].shape[1]
        ids[row, length - n :] = e["input_ids"][0]
        mask[row, length - n :] = 1
    pixels = [e["pixel_values"] for e in encoded if "pixel_values" in e]
    pixel_values = torch.cat(pixels) if pixels else None
    out = model.generate(
        ids,
        attention_mask=mask,
        pixel_values=pixel_values,
        max_new_tokens=max_new_tokens,
        eos_token_id=processor.stop_token_ids,
        pad_token_id=pad,
        **kwargs,
    )
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]


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
