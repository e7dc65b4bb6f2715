"""Per-sample cost of turning a conversation into ids and labels, per template.

`template: auto` renders each sample through the tokenizer's Jinja chat template (twice: with
markers in the answers' places, then with the answers) where the TinyLLaVA templates format
strings; datasets are tokenized once, up front, so this is a one-time cost per stage.
Uses the test tokenizers (tests/tiny_tokenizers.py: the real kinds, tiny vocabularies), so
the numbers are the template's share of the cost, not a real tokenizer's.

    python bench/template_encode.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from transformers import AutoTokenizer  # noqa: E402

from tinylmm.data.processor import ImageProcessor, Processor  # noqa: E402

from tiny_tokenizers import FAMILIES, family_tokenizer  # noqa: E402

CONV = [
    ("human", "<image>\nWhat color is the circle in the top left cell?"),
    ("gpt", "The circle is red."),
    ("human", "How many squares are there?"),
    ("gpt", "There are two squares."),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    args = ap.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"{args.samples} encodes of a 2-turn conversation with an image, best of 3"
    )
    print("| family | template | ms per sample |\n| --- | --- | ---: |")
    images = ImageProcessor(size=8, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for family, fam in FAMILIES.items():
        tok = AutoTokenizer.from_pretrained(str(family_tokenizer(family)))
        proc = Processor(tok, images, fam.template, num_image_tokens=16)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(args.samples):
                proc.encode(CONV, num_images=1)
            best = min(best, time.perf_counter() - t)
        print(f"| {family} | {fam.template} | {1000 * best / args.samples:.3f} |")


if __name__ == "__main__":
    main()
