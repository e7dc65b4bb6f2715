"""The Python API: load a trained checkpoint and ask it about an image.

tinylmm train --recipe share                 # writes runs/<run>/final
python examples/python_api.py runs/<run>/final path/to/image.png "What color is the circle?"
"""

import sys

from PIL import Image

import tinylmm
from tinylmm.models.generation import chat_reply, generate_batch


def main(checkpoint: str, image_path: str, question: str) -> None:
    model, processor = tinylmm.load(checkpoint)  # a ready model (eval mode) + its processor
    image = Image.open(image_path)

    # One answer, streamed piece by piece as it is generated.
    print("A: ", end="")
    chat_reply(
        model,
        processor,
        [("human", f"<image>\n{question}")],
        [image],
        on_text=lambda t: print(t, end="", flush=True),
        max_new_tokens=32,
    )
    print()

    # Several questions at once (left-padded batch, greedy).
    questions = ["How many shapes are there?", "Is there a red circle?"]
    answers = generate_batch(
        model,
        processor,
        [[("human", f"<image>\n{q}")] for q in questions],
        [[image]] * len(questions),
        max_new_tokens=8,
    )
    for q, a in zip(questions, answers):
        print(f"Q: {q}\nA: {a}")

    # The lower level: model inputs, then the LLM's generate() (KV cache) on the merged embeddings.
    inputs = processor.prompt([("human", f"<image>\n{question}")], [image])
    ids = model.generate(**inputs, max_new_tokens=8)
    print("raw:", processor.tokenizer.decode(ids[0], skip_special_tokens=True))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
