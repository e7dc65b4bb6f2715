"""Train on your own LLaVA-format data.

This script writes a few images and a LLaVA-format JSON (so it runs as is), then trains
the toy preset on them through the `base` recipe and asks the result a question. For your
own data, point the stages at your files instead:

    tinylmm train --preset toy --recipe base \
        'stages.pretrain.data={json: my/captions.json, images: my/images}' \
        'stages.finetune.data={json: my/instruct.json, images: my/images}'

Run:  python examples/train_on_your_data.py [OUT_DIR]
"""

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

import tinylmm
from tinylmm.api import train_run

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}


def write_data(root: Path) -> tuple[Path, Path, Path]:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    captions, instruct = [], []
    for i in range(48):
        name = list(COLORS)[i % 3]
        img = Image.new("RGB", (64, 64), (250, 250, 250))
        ImageDraw.Draw(img).ellipse((16, 16, 48, 48), fill=COLORS[name])
        img.save(images / f"{i}.png")
        captions.append(
            {
                "id": f"cap-{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": f"A {name} circle."},
                ],
            }
        )
        instruct.append(
            {
                "id": f"qa-{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is the circle?"},
                    {"from": "gpt", "value": name},
                ],
            }
        )
    # A text-only sample is fine too.
    instruct.append(
        {"id": "text-0", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]}
    )
    (root / "captions.json").write_text(json.dumps(captions, indent=1))
    (root / "instruct.json").write_text(json.dumps(instruct, indent=1))
    return root / "captions.json", root / "instruct.json", images


def main(out: Path) -> None:
    captions, instruct, images = write_data(out / "data")
    result = train_run(
        preset="toy",
        recipe="base",
        output_dir=out / "run",
        evaluate=False,
        overrides=[
            f"stages.pretrain.data={{json: {captions}, images: {images}}}",
            f"stages.finetune.data={{json: {instruct}, images: {images}}}",
            "stages.pretrain.epochs=4",
            "stages.finetune.epochs=8",
        ],
    )
    model, processor = tinylmm.load(result.final)
    from tinylmm.models.generation import chat_reply

    image = Image.open(images / "0.png")
    answer = chat_reply(model, processor, [("human", "<image>\nWhat color is the circle?")], [image], max_new_tokens=5)
    print(f"model: {result.final}\nQ: What color is the circle? (it is red)\nA: {answer}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/example-own-data"))
