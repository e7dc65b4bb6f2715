"""Build the toy preset's tokenizer (`builtin:toy`); scripts/pretrain_toy.py saves it with the toy LLM.

A 512-token byte-level BPE trained on the `shapes` text and the TinyLLaVA chat template, so
the toy model's sequences are short; the byte alphabet keeps any text encodable. Special
tokens follow LLaMA: <unk>=0, <s>=1 (prepended, like add_bos), </s>=2, plus <pad>=3.
Training is deterministic: rerunning it reproduces tokenizer.json byte for byte.

    python scripts/build_toy_tokenizer.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from tinylmm.data import shapes  # noqa: E402
from tinylmm.data.templates import TINYLLAVA_SYSTEM  # noqa: E402

VOCAB_SIZE = 512
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, in this order
TEMPLATE_TEXT = TINYLLAVA_SYSTEM + " USER: ASSISTANT:"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tinylmm" / "assets" / "toy" / "llm"


def texts():
    for text in shapes.corpus(seed=0, n=2000):
        yield text
        yield " " + text  # answers follow "ASSISTANT: ": learn " no", " 2" ... as single tokens too
    for _ in range(200):  # weight the template so its words become single tokens
        yield TEMPLATE_TEXT


def build() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    tok = build()
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL]
    assert ids == [0, 1, 2, 3], f"special token ids {ids}"
    tok.save_pretrained(args.out)
    print(f"saved {len(tok)} tokens to {args.out}")


if __name__ == "__main__":
    main()
