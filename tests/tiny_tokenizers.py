"""Tiny tokenizers of the real kinds, trained on the spot, for tests.

    path = make_tokenizer("qwen3", tmp_path / "tok")   # a transformers tokenizer directory
    path = cached_tokenizer("gemma2")                   # built once per test process
    fam = FAMILIES["llama3.2"]    # Family(kind="llama3", template="auto", end_token="<|eot_id|>", ...)

Each kind is trained with the `tokenizers` library on a small built-in corpus (a few ms, a
vocabulary of a few hundred tokens, so tiny models stay tiny) and saved with the family's
special tokens (bos / eos / pad / unk set as in the real tokenizer_config.json) and, where
the family ships one, a chat template written here to produce the family's documented text
format. The model families map to a tokenizer kind, the template their preset uses, the
token that ends an answer under that template and the BOS the model sees once (FAMILIES).

(Not named tests/tokenizers.py: the tests directory is on sys.path, so that name would
shadow the `tokenizers` library that transformers imports.)
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# -------------------------------------------------------------------------- chat templates
# Written for these tests from each family's documented format (not the official files):
# the text they render is what matters, and the tests compare it to the documented format.

# ChatML (Qwen2.5, SmolLM2): a default system message when the conversation has none.
_CHATML = (
    "{%- if messages[0].role == 'system' %}"
    "{%- set system = messages[0].content %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = DEFAULT %}{%- set turns = messages %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
    "{%- for m in turns %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _chatml(default_system: str) -> str:
    return "{%- set DEFAULT = " + json.dumps(default_system) + " %}" + _CHATML


# Qwen3: no default system message; the answers after the last user message carry a
# `<think>` block (empty when there is no reasoning; text before `</think>` in an answer is
# taken as its reasoning); earlier answers are shown without it. With enable_thinking=false
# the generation prompt opens an empty think block so the model answers directly.
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Llama-3.2: BOS, then always a system header with the knowledge-cutoff and date lines (today's
# date where the renderer offers strftime_now, as the official template), then headed turns ending in
# <|eot_id|>; contents are trimmed.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}"
    "{%- set system = messages[0].content | trim %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- if date_string is not defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
    "{%- endif %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{{- system + '<|eot_id|>' }}"
    "{%- for m in turns %}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Gemma-2: BOS, user/model turns, no system role (an error, as the official template).
GEMMA2_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{{- '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\\n' + m.content | trim"
    " + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# TinyLlama-1.1B-Chat (Zephyr format): role markers are plain text, answers end with </s>.
ZEPHYR_TEMPLATE = (
    "{%- for m in messages %}{{- '<|' + m.role + '|>\\n' + m.content + eos_token + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

# ------------------------------------------------------------------------ tokenizer kinds

# GPT-2's pre-tokenizer regex is ByteLevel's built-in one; Qwen2 / Llama-3 split with a
# cl100k-style regex (digits one by one for Qwen, up to three for Llama-3).
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Kind:
    style: str  # "byte_bpe" (GPT-2 style byte-level BPE) | "sentencepiece" (Metaspace, byte fallback)
    specials: tuple[str, ...]  # special tokens, given the first ids in this order
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False  # the tokenizer puts `bos` before every text (add_special_tokens=True)
    added: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's think tags)
    split: str | None = None  # byte_bpe: a pre-tokenizer regex (None: GPT-2's)
    digits: bool = False  # byte_bpe: split digits one by one (StableLM-2)
    prepend: str = "first"  # sentencepiece: Metaspace prepend scheme ("never" for Gemma)
    chat_template: str | None = None


KINDS: dict[str, Kind] = {
    # Phi-2 (CodeGen/GPT-2 vocabulary): one special token for everything; no chat template.
    "gpt2": Kind("byte_bpe", ("<|endoftext|>",), bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>"),
    # StableLM-2 (Arcade100k, byte-level, digits split); the preset uses TinyLLaVA's phi format.
    "stablelm2": Kind(
        "byte_bpe", ("<|endoftext|>",), bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>", digits=True
    ),
    # TinyLlama / Llama-2 SentencePiece: <unk> <s> </s>, byte fallback, BOS added to every text.
    "llama2": Kind(
        "sentencepiece",
        ("<unk>", "<s>", "</s>"),
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        add_bos=True,
        chat_template=ZEPHYR_TEMPLATE,
    ),
    "qwen2.5": Kind(
        "byte_bpe",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        split=_SPLIT % "",
        chat_template=_chatml(QWEN25_SYSTEM),
    ),
    "qwen3": Kind(
        "byte_bpe",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        added=("<think>", "</think>"),
        split=_SPLIT % "",
        chat_template=QWEN3_TEMPLATE,
    ),
    "smollm2": Kind(
        "byte_bpe",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos="<|im_start|>",
        eos="<|im_end|>",
        pad="<|im_end|>",
        unk="<|endoftext|>",
        digits=True,
        chat_template=_chatml(SMOLLM2_SYSTEM),
    ),
    "llama3": Kind(
        "byte_bpe",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        add_bos=True,
        split=_SPLIT % "{1,3}",
        chat_template=LLAMA3_TEMPLATE,
    ),
    "gemma2": Kind(
        "sentencepiece",
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        prepend="never",
        chat_template=GEMMA2_TEMPLATE,
    ),
}
TOY = "toy"  # the shipped builtin:toy tokenizer, copied


@dataclass(frozen=True)
class Family:
    kind: str  # the tokenizer kind (KINDS, or "toy")
    template: str  # the template its preset uses: phi | llama | auto
    end_token: str  # what ends an assistant answer under that template (the generation stop token)
    bos: str | None  # the BOS token the model sees exactly once at the start, or None


FAMILIES: dict[str, Family] = {
    "phi2": Family("gpt2", "phi", "<|endoftext|>", None),
    "stablelm2": Family("stablelm2", "phi", "<|endoftext|>", None),
    "tinyllama": Family("llama2", "llama", "</s>", "<s>"),
    "qwen2.5": Family("qwen2.5", "auto", "<|im_end|>", None),
    "qwen3": Family("qwen3", "auto", "<|im_end|>", None),
    "smollm2": Family("smollm2", "auto", "<|im_end|>", None),  # its "bos" <|im_start|> is only a role marker
    "llama3.2": Family("llama3", "auto", "<|eot_id|>", "<|begin_of_text|>"),
    "gemma2": Family("gemma2", "auto", "<end_of_turn>", "<bos>"),
    "toy": Family(TOY, "llama", "</s>", "<s>"),
}

# Words of the tests' conversations, the system prompts and the shapes data: enough for
# merges that make ordinary words a few tokens; anything else still encodes (bytes).
CORPUS = """\
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the user's questions. USER: ASSISTANT: system user assistant model
You are Qwen, created by Alibaba Cloud. You are a helpful assistant. You are a helpful AI assistant
named SmolLM, trained by Hugging Face. Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024
Describe the image. What is in the image? Describe the shapes in this picture. Give a short description.
There is 1 shape: a red circle at the top left. There are 3 shapes: a green square at the top right,
a blue triangle at the bottom left and a yellow circle at the bottom right. purple orange
What color is the circle? What shape is the blue object? How many squares are there? Where is the
red circle? Is there a green triangle? yes no 0 1 2 3 4 5 6 7 8 9 10 42 100 2024
The quick brown fox jumps over the lazy dog. Hello world, this is a test of the tokenizer.
""".split("\n")


def _trained_bpe(kind: Kind, vocab_size: int):
    """A BPE model trained on CORPUS with the kind's pre-tokenization."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    if kind.style == "byte_bpe":
        tok = Tokenizer(models.BPE())
        steps = []
        if kind.split is not None:
            steps.append(pre_tokenizers.Split(Regex(kind.split), behavior="isolated"))
        if kind.digits:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind.split is None))
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=kind.prepend)
        alphabet = []
    # The specials take the first ids (trainer order), as in the real vocabularies.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(kind.specials), initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _sentencepiece(kind: Kind):
    """SentencePiece-style BPE: specials, then the 256 byte tokens <0x00>..<0xFF> (for any
    character the corpus lacks, e.g. the newline), then the trained pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    trained = json.loads(_trained_bpe(kind, 160).to_str())["model"]
    vocab = {t: i for i, t in enumerate(kind.specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=kind.unk, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=kind.prepend)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if kind.prepend != "never":
        steps.append(decoders.Strip(" ", 1, 0))  # the space Metaspace put before the first word
    tok.decoder = decoders.Sequence(steps)
    return tok


def _build(kind: Kind):
    from tokenizers import AddedToken, decoders, processors

    if kind.style == "byte_bpe":
        tok = _trained_bpe(kind, 256 + 160)
        tok.decoder = decoders.ByteLevel()
        post = [processors.ByteLevel(trim_offsets=False)]
    else:
        tok = _sentencepiece(kind)
        post = []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in kind.specials])
    if kind.added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in kind.added])
    if kind.add_bos:
        bos_id = tok.token_to_id(kind.bos)
        post.append(
            processors.TemplateProcessing(
                single=f"{kind.bos} $A", pair=f"{kind.bos} $A {kind.bos} $B", special_tokens=[(kind.bos, bos_id)]
            )
        )
    if post:
        tok.post_processor = processors.Sequence(post) if len(post) > 1 else post[0]
    return tok


def make_tokenizer(kind: str, directory: str | Path) -> Path:
    """Train a tokenizer of `kind` (a KINDS key, or "toy") and save it to `directory` as a
    transformers tokenizer directory; returns the directory."""
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    if kind == TOY:
        from tinylmm.resources import asset

        shutil.copytree(asset("toy/llm"), directory, dirs_exist_ok=True)
        return directory
    if kind not in KINDS:
        raise KeyError(f"unknown tokenizer kind '{kind}'; known: {', '.join([*KINDS, TOY])}")
    spec = KINDS[kind]
    names = {
        k: v
        for k, v in dict(bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad, unk_token=spec.unk).items()
        if v is not None
    }
    tok = PreTrainedTokenizerFast(tokenizer_object=_build(spec), **names)
    if spec.chat_template is not None:
        tok.chat_template = spec.chat_template
    tok.save_pretrained(str(directory))
    return directory


_CACHE_ROOT: list[Path] = []


@functools.cache
def cached_tokenizer(kind: str) -> Path:
    """make_tokenizer(kind, ...) once per process, into a temporary directory removed at exit."""
    if not _CACHE_ROOT:
        _CACHE_ROOT.append(Path(tempfile.mkdtemp(prefix="tinylmm-tokenizers-")))
        atexit.register(shutil.rmtree, _CACHE_ROOT[0], True)
    return make_tokenizer(kind, _CACHE_ROOT[0] / kind)


def family_tokenizer(family: str) -> Path:
    """The cached tokenizer directory of a model family (a FAMILIES key)."""
    return cached_tokenizer(FAMILIES[family].kind)


def model_token_ids(path: str | Path) -> dict:
    """vocab_size / bos / eos / pad ids for a tiny model config that matches the tokenizer at
    `path` (vocab_size leaves room for the <image> token the processor adds)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return {
        "vocab_size": len(tok) + 1,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    }
