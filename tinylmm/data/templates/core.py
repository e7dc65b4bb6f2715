"""Conversation templates and label masking.

A template renders a LLaVA conversation (alternating human / gpt turns) to one string
and returns the character spans that are supervised: each assistant answer and its end
token. Tokenizing the whole string once with offsets and keeping the tokens that overlap
those spans gives exactly the tokens a model sees at inference, with no per-template
length arithmetic to get wrong (the source of LLaVA's "tokenization mismatch").

Two sorts of template:

- `Template`: a format written here (TinyLLaVA's `phi` and `llama`, and the caption-only
  `pretrain`), usable with any tokenizer whose vocabulary has its end token.
- `ChatTemplate` (`template: auto`): the tokenizer's own chat template (ChatML for Qwen and
  SmolLM2, Llama-3's headers, Gemma's turns ...), rendered through `apply_chat_template`.
  It is bound to that tokenizer: `bind_template("auto", tokenizer)`.

Both are checked against the tokenizer before any data is read (`check`), so a template of
another model family is an error naming both, never a dataset whose labels are all masked
(the "loss = 0" failure of LLaVA-style code with a wrong conversation format).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tinylmm.errors import TemplateError, TemplateMismatch
from tinylmm.registry import Registry

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
AUTO = "auto"

TINYLLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def _check_alternation(turns) -> None:
    for i, (role, _) in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise TemplateError(f"turn {i} is from '{role}', expected '{expected}' (turns must alternate)")


def human_text(value: str, image_format: str) -> str:
    """A human turn's text with its images where `image_format` puts them (LLaVA: first);
    a turn with several images keeps the extra `<image>` tokens in front."""
    n = value.count(IMAGE_TOKEN)
    content = value.replace(IMAGE_TOKEN, "").strip()
    if not n:
        return content
    return IMAGE_TOKEN * (n - 1) + image_format.format(content=content).strip()


def _single_token(tokenizer, text: str) -> bool:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


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
    description: str = field(default="", compare=False)  # one line for `tinylmm ls templates`

    # The text carries no BOS: the tokenizer adds its own (add_special_tokens=True).
    add_special_tokens = True

    def end_token(self, tokenizer) -> str:
        eos = self.eos or tokenizer.eos_token
        if eos is None:
            raise TemplateError(f"template '{self.name}' needs an eos token but the tokenizer has none")
        return eos

    def check(self, tokenizer) -> None:
        """Refuse a tokenizer of another family: the end token (what the model learns to stop
        on) must be one token of its vocabulary. The caption template ends with plain text."""
        if self.caption_only:
            return
        eos = self.end_token(tokenizer)
        if eos in tokenizer.get_vocab() and _single_token(tokenizer, eos):
            return
        fits = [
            n
            for n, t in TEMPLATES.items()
            if isinstance(t, Template)
            and not t.caption_only
            and t.eos in tokenizer.get_vocab()
            and _single_token(tokenizer, t.eos)
        ]
        if getattr(tokenizer, "chat_template", None):
            fits.append(AUTO)
        hint = (
            f"set model.template to {' or '.join(repr(f) for f in fits)}"
            if fits
            else "use the template of this LLM's family (`tinylmm ls templates`)"
        )
        raise TemplateError(
            f"template '{self.name}' ends each answer with {eos!r}, which is not one token of tokenizer "
            f"'{tokenizer_name(tokenizer)}': the template belongs to another model family (its answers would end "
            f"in a stop token the model cannot emit); {hint}"
        )

    def bind(self, tokenizer) -> Template:
        """This template for `tokenizer`, checked against it."""
        self.check(tokenizer)
        return self

    def render(self, turns: list[tuple[str, str]], eos: str, add_generation_prompt: bool = False):
        """turns: (role, text) pairs, role 'human' or 'gpt', starting with human.

        Returns (text, supervised character spans)."""
        _check_alternation(turns)
        text = self.system + " " if self.system else ""
        spans: list[tuple[int, int]] = []
        for role, value in turns:
            if role == "human":
                if self.caption_only:
                    text += IMAGE_TOKEN * value.count(IMAGE_TOKEN)
                    continue
                text += self.user.format(content=human_text(value, self.image))
            else:
                before, after = self.assistant.split("{content}")
                # Supervised from where the inference prompt ends: "ASSISTANT:" is the prompt, so
                # the model generates " red</s>", space included (it may be a token of its own).
                start = len(text) + (
                    len(self.generation_prompt) if before.startswith(self.generation_prompt) else len(before)
                )
                text += before + value + after.format(eos=eos)
                spans.append((start, len(text)))
        if add_generation_prompt:
            if len(turns) % 2 != 1:
                raise TemplateError("a generation prompt needs the conversation to end with a human turn")
            text += self.generation_prompt
        return text, spans


TEMPLATES: Registry = Registry("template")  # name -> a Template, or ChatTemplate (`auto`, bound to a tokenizer)


# Stand-ins for the answers while the chat template renders: private-use characters that
# no data holds and no string filter of a template (trim, strip, upper ...) changes.
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000(\\d+)\ue001")
# Markup that looks like a special token: `<|im_start|>`-style and `<start_of_turn>`-style.
_MARKUP = (re.compile(r"<\|[^<>|\s]+\|>"), re.compile(r"</?[A-Za-z][\w.-]*>"))
# The conversation every chat template is checked with at binding time.
PROBE = [
    ("human", IMAGE_TOKEN + "\nWhat is in the picture?"),
    ("gpt", "A red circle."),
    ("human", "Where is it?"),
    ("gpt", "At the top left."),
]


# Llama-3.x's chat template's own default when it cannot read the clock.
FIXED_DATE = "26 Jul 2024"


class ChatTemplate:
    """`auto`: the conversation format of the tokenizer's own chat template.

    Human turns become `user` messages (the image first, as `Template.image`), answers become
    `assistant` messages, both stripped (chat templates commonly trim them). No system
    message is given: a template's default one (Qwen2.5, SmolLM2) stays, and Gemma's, which
    has none, is not upset. Every call passes `enable_thinking=False`: Qwen3's generation
    prompt then opens an empty `<think>` block, as its template renders the last answer, so
    the inference prompt is the training text up to that answer; earlier answers are
    rendered as the template renders history (Qwen3: without a think block), i.e. the
    training text is exactly the template's own rendering of the conversation. `date_string`
    is fixed too: Llama-3.x's template otherwise writes today's date into its system header,
    and the same sample would tokenize differently from one day to the next.

    Supervised: each answer's text and the special token the template writes right after
    it (found at binding time: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>` ...). Answers are
    located by rendering the conversation with markers in their place, then checking that
    the real rendering is that text with the answers put back, so an answer is never looked
    for by searching (it could occur in a question or a role header).

    The rendering carries the template's BOS text (`<|begin_of_text|>`, `<bos>`), so it is
    tokenized without the tokenizer's special tokens (as transformers does): one BOS.
    """

    name = AUTO
    caption_only = False
    add_special_tokens = False
    image = IMAGE_TOKEN + "\n{content}"
    description = "the tokenizer's own chat template (Qwen2.5/3, SmolLM2, Llama-3, Gemma-2 ...)"

    @classmethod
    def bind(cls, tokenizer) -> ChatTemplate:
        return cls(tokenizer)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokenizer_name = tokenizer_name(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"template 'auto' uses the tokenizer's chat template, but tokenizer '{self.tokenizer_name}' has "
                "none (a base model's tokenizer often has none); set model.template to the format of this LLM's "
                "family (phi, llama: `tinylmm ls templates`) or use a tokenizer that ships a chat template"
            )
        self.eos = self._bind()

    def __repr__(self) -> str:
        return f"ChatTemplate(auto, tokenizer={self.tokenizer_name!r}, end_token={self.eos!r})"

    # ------------------------------------------------------------------ the Template API

    def end_token(self, tokenizer) -> str:
        self.check(tokenizer)
        return self.eos

    def check(self, tokenizer) -> None:
        if tokenizer is not self.tokenizer:
            raise TemplateError(
                f"this 'auto' template is bound to tokenizer '{self.tokenizer_name}', not to "
                f"'{tokenizer_name(tokenizer)}'; bind one with bind_template('auto', tokenizer)"
            )

    def render(self, turns: list[tuple[str, str]], eos: str | None = None, add_generation_prompt: bool = False):
        """As Template.render; `eos`, if given, must be the end token this template found."""
        if eos is not None and eos != self.eos:
            raise TemplateError(
                f"the chat template of '{self.tokenizer_name}' ends answers with {self.eos!r}, not {eos!r}"
            )
        if add_generation_prompt and len(turns) % 2 != 1:
            raise TemplateError("a generation prompt needs the conversation to end with a human turn")
        text, answers = self._locate(turns, add_generation_prompt)
        spans = []
        for k, (start, end) in enumerate(answers):
            if not text.startswith(self.eos, end):
                raise TemplateMismatch(
                    f"the chat template of '{self.tokenizer_name}' ends answer {k} with "
                    f"{text[end : end + 24]!r}, not with {self.eos!r}"
                )
            spans.append((start, end + len(self.eos)))
        return text, spans

    # ------------------------------------------------------------------ internals

    def _apply(self, messages, add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=False,
                date_string=FIXED_DATE,
            )
        except Exception as e:  # noqa: BLE001 - jinja errors, raise_exception() in a template
            raise TemplateMismatch(
                f"the chat template of '{self.tokenizer_name}' refused the conversation ({type(e).__name__}: {e})"
            ) from None

    def _locate(self, turns, add_generation_prompt: bool):
        """The rendering of `turns` and the (start, end) of each answer's text in it."""
        _check_alternation(turns)
        messages, answers = [], []
        for role, value in turns:
            if role == "human":
                messages.append({"role": "user", "content": human_text(value, self.image)})
            else:
                messages.append({"role": "assistant", "content": _MARK.format(len(answers))})
                answers.append(value.strip())
        marked = self._apply(messages, add_generation_prompt)
        pieces = _MARK_RE.split(marked)  # text, index, text, index, ..., text
        if [int(i) for i in pieces[1::2]] != list(range(len(answers))):
            raise TemplateMismatch(
                f"the chat template of '{self.tokenizer_name}' does not render every answer once and in order"
            )
        text, spans = pieces[0], []
        for answer, after in zip(answers, pieces[2::2]):
            spans.append((len(text), len(text) + len(answer)))
            text += answer + after
        real = iter(answers)
        for m in messages:
            if m["role"] == "assistant":
                m["content"] = next(real)
        if self._apply(messages, add_generation_prompt) != text:
            raise TemplateMismatch(
                f"the chat template of '{self.tokenizer_name}' changes the text of an answer "
                "(it renders it differently from the data), so the supervised tokens cannot be "
                "located"
            )
        return text, spans

    def _bind(self) -> str:
        """Find the end-of-turn token on PROBE and check the template against the tokenizer."""
        where = f"template 'auto' with tokenizer '{self.tokenizer_name}'"
        try:
            text, answers = self._locate(PROBE, False)
        except TemplateMismatch as e:
            raise TemplateError(f"{where}: {e}") from None
        specials = sorted(
            (t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True
        )
        ends = []
        for _, end in answers:
            after = text[end:]
            found = next((s for s in specials if after.startswith(s)), None)
            if found is None:
                raise TemplateError(
                    f"{where}: the chat template ends an answer with {after[:24]!r}, which does not start with a "
                    "special token of the vocabulary, so the model could not learn where its answer stops (the "
                    "chat template is not this tokenizer's, or it writes its markers as plain text); use the "
                    "template of this LLM's family (phi, llama)"
                )
            ends.append(found)
        if len(set(ends)) != 1:
            raise TemplateError(f"{where}: the chat template ends answers with different tokens {ends}")
        eos = ends[0]
        if not _single_token(self.tokenizer, eos):
            raise TemplateError(f"{where}: the end-of-turn token {eos!r} is not one token of the vocabulary")
        # Markup of the same form as the end token is meant to be special tokens too: a role
        # marker the vocabulary lacks is split into pieces the model was never trained on.
        form = next((f for f in _MARKUP if f.fullmatch(eos)), None)
        if form is not None:
            missing = sorted(
                {
                    m
                    for m in form.findall(text)
                    if m != IMAGE_TOKEN  # ours, in the user text
                    and not _single_token(self.tokenizer, m)
                }
            )
            if missing:
                raise TemplateError(
                    f"{where}: the chat template writes {', '.join(missing)}, which the tokenizer splits into "
                    f"pieces (not special tokens of its vocabulary, unlike {eos!r}): the chat template does not "
                    "belong to this tokenizer; use the model's own tokenizer, or a template of its family"
                )
        # Train/inference agreement: the generation prompt of the conversation before the last
        # answer is the training text up to that answer.
        prompt, _ = self._locate(PROBE[:-1], True)
        start = answers[-1][0]
        if prompt != text[:start]:
            raise TemplateError(
                f"{where}: the chat template's generation prompt differs from how it renders an answer, so the "
                f"model would be prompted differently from how it was trained (prompt ends {prompt[-40:]!r}, the "
                f"training text has {text[max(0, start - 40) : start]!r} before the answer)"
            )
        return eos


TEMPLATES.register(AUTO, ChatTemplate)


def template_names() -> list[str]:
    return TEMPLATES.names()


def describe_templates() -> list[tuple[str, str]]:
    """(name, one line) for `tinylmm ls templates`."""
    return [(name, entry.description) for name, entry in TEMPLATES.items()]


def get_template(name: str) -> Template:
    """A template written here, by name (`auto` needs a tokenizer: bind_template)."""
    entry = TEMPLATES.get(name)
    if not isinstance(entry, Template):
        raise TemplateError(f"template '{name}' comes from a tokenizer: use bind_template('{name}', tokenizer)")
    return entry


def bind_template(name: str, tokenizer) -> Template | ChatTemplate:
    """The template `name` for `tokenizer`, checked against it (TemplateError if they do not fit)."""
    return TEMPLATES.get(name).bind(tokenizer)


def tokenize_pieces(tokenizer, text: str, add_special_tokens: bool = True):
    """Token ids of `text` and their character offsets (empty for added tokens such as bos).

    The text between `<image>` markers is tokenized piece by piece, as LLaVA's and
    TinyLLaVA's `tokenizer_image_token` do (only the first piece keeps its bos): tokenizing
    the whole string would differ after an image for tokenizers that prefix a word
    boundary only at the very start (non-legacy Llama/Gemma sentencepiece: their "▁\n").
    `add_special_tokens=False` for chat templates, which write their BOS into the text."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids, offsets, start = [], [], 0
    for k, piece in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            ids.append(image_id)
            offsets.append((start - len(IMAGE_TOKEN), start))
        enc = tokenizer(piece, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
        piece_ids, piece_offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if k and piece_ids[:1] == [tokenizer.bos_token_id]:
            piece_ids, piece_offsets = piece_ids[1:], piece_offsets[1:]
        ids += piece_ids
        offsets += [(s + start, e + start) if e > s else (0, 0) for s, e in piece_offsets]
        start += len(piece) + len(IMAGE_TOKEN)
    return ids, offsets


def tokenize_with_labels(tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool = True):
    """Token ids of `text` (see `tokenize_pieces`) and labels that keep only tokens
    overlapping a supervised span; and the number of tokens per span."""
    ids, offsets = tokenize_pieces(tokenizer, text, add_special_tokens)
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
