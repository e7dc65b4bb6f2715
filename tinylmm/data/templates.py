"""Conversation templates and label masking.

A template renders a LLaVA conversation (alternating human / gpt turns) to one string
and returns the character spans that are supervised: each assistant answer and its end
token. Tokenizing the whole string once with offsets and keeping the tokens that overlap
those spans gives exactly the tokens a model sees at inference, with no per-template
length arithmetic to get wrong (the source of LLaVA's "tokenization mismatch").
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100

TINYLLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Template:
    name: str
    system: str = ""
    user: str = "USER: {content} "
    assistant: str = "ASSISTANT: {content}{eos}"
    image: str = IMAGE_TOKEN + "\n{content}"  # where the image goes in its human turn
    generation_prompt: str = "ASSISTANT:"  # the prompt ends here; TinyLLaVA has no space
    eos: str | None = None  # end-of-answer text; None: the tokenizer's eos token
    caption_only: bool = False  # pretrain: the human turn is only the image

    def end_token(self, tokenizer) -> str:
        eos = self.eos or tokenizer.eos_token
        if eos is None:
            raise TemplateError(f"template '{self.name}' needs an eos token but the tokenizer has none")
        return eos

    def render(self, turns: list[tuple[str, str]], eos: str, add_generation_prompt: bool = False):
        """turns: (role, text) pairs, role 'human' or 'gpt', starting with human.

        Returns (text, supervised character spans)."""
        text = self.system + " " if self.system else ""
        spans: list[tuple[int, int]] = []
        for i, (role, value) in enumerate(turns):
            expected = "human" if i % 2 == 0 else "gpt"
            if role != expected:
                raise TemplateError(f"turn {i} is from '{role}', expected '{expected}' (turns must alternate)")
            if role == "human":
                has_image = IMAGE_TOKEN in value
                content = value.replace(IMAGE_TOKEN, "").strip()
                if self.caption_only:
                    text += IMAGE_TOKEN * value.count(IMAGE_TOKEN)
                    continue
                if has_image:
                    content = self.image.format(content=content).strip()
                    content = IMAGE_TOKEN * (value.count(IMAGE_TOKEN) - 1) + content
                text += self.user.format(content=content)
            else:
                before, after = self.assistant.split("{content}")
                text += before
                start = len(text)
                text += value + after.format(eos=eos)
                spans.append((start, len(text)))
        if add_generation_prompt:
            if len(turns) % 2 != 1:
                raise TemplateError("a generation prompt needs the conversation to end with a human turn")
            text += self.generation_prompt
        return text, spans


TEMPLATES: dict[str, Template] = {
    # TinyLLaVA's phi format (also used for StableLM-2): `<|endoftext|>` ends an answer.
    "phi": Template("phi", system=TINYLLAVA_SYSTEM, eos="<|endoftext|>"),
    # TinyLLaVA's llama format (TinyLlama and the toy preset): bos from the tokenizer, `</s>`.
    "llama": Template("llama", system=TINYLLAVA_SYSTEM, eos="</s>"),
    # TinyLLaVA's format ending answers with the tokenizer's own eos: their `gemma` (<eos>)
    # and `qwen2_instruct` (<|im_end|>) conversation versions; `tinylmm convert` picks it.
    "tinyllava": Template("tinyllava", system=TINYLLAVA_SYSTEM),
    # Caption alignment (TinyLLaVA/LLaVA "pretrain"/"plain"): `<image>` then the caption
    # and a newline; only the caption and the newline are supervised.
    "pretrain": Template(
        "pretrain", system="", user="{content}", assistant="{content}{eos}", eos="\n",
        generation_prompt="", caption_only=True,
    ),
}


def get_template(name: str) -> Template:
    from tinylmm.config import unknown

    if name not in TEMPLATES:
        raise unknown("template", name, TEMPLATES)
    return TEMPLATES[name]


def tokenize_with_labels(tokenizer, text: str, spans: list[tuple[int, int]]):
    """Token ids of `text` and labels that keep only tokens overlapping a supervised span.

    The text between `<image>` markers is tokenized piece by piece, as LLaVA's and
    TinyLLaVA's `tokenizer_image_token` do (only the first piece keeps its bos): tokenizing
    the whole string would differ after an image for tokenizers that prefix a word
    boundary only at the very start (non-legacy Llama/Gemma sentencepiece: their "▁\n")."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids, offsets, start = [], [], 0
    for k, piece in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            ids.append(image_id)
            offsets.append((start - len(IMAGE_TOKEN), start))
        enc = tokenizer(piece, return_offsets_mapping=True, add_special_tokens=True)
        piece_ids, piece_offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if k and piece_ids[:1] == [tokenizer.bos_token_id]:
            piece_ids, piece_offsets = piece_ids[1:], piece_offsets[1:]
        ids += piece_ids
        offsets += [(s + start, e + start) if e > s else (0, 0) for s, e in piece_offsets]
        start += len(piece) + len(IMAGE_TOKEN)
    labels = [IGNORE_INDEX] * len(ids)
    per_span = [0] * len(spans)
    for t, (s, e) in enumerate(offsets):
        if e <= s:
            continue  # tokens added by the tokenizer (bos) have empty spans
        for k, (a, b) in enumerate(spans):
            if s < b and e > a:
                labels[t] = ids[t]
                per_span[k] += 1
                break
    return ids, labels, per_span
