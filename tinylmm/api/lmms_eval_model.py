"""The lmms-eval plugin: a tinylmm checkpoint as lmms-eval's chat model `tinylmm`.

    pip install 'tinylmm[lmms-eval]'
    lmms-eval --model tinylmm --model_args pretrained=runs/x/final --tasks TASK --batch_size 8

lmms-eval finds it through the entry point in tinylmm/api/lmms_eval_plugin.py.

The class follows lmms-eval's chat-model contract (`lmms_eval/api/model.py`, `is_simple =
False`): each request's `args` are `(ctx, doc_to_messages, gen_kwargs, doc_id, task, split)`,
the document is `self.task_dict[task][split][doc_id]`, and `doc_to_messages(doc)` gives the
messages (for a task without its own `doc_to_messages`, lmms-eval builds them from the task's
`doc_to_visual` and `doc_to_text`: the images, then the text, in one user turn). The checkpoint
is loaded with tinylmm's own loader (`tinylmm.api.load`) and answered with tinylmm's batched
generation (`models.generation.generate_batch`), the images written first in the user's turn
(`<image>\\n` + text), as `tinylmm eval run` and LLaVA's eval scripts put them.

Generation kwargs read: `max_new_tokens` (default 128), `temperature` (0: greedy), `do_sample`,
`top_p`, `num_beams`, and `until` (the answer is cut at the first stop string, as lmms-eval's
own models cut it). Other kwargs are named in a warning. Refused with an error naming the
task and document: system messages (the checkpoint's template has its own system prompt),
video and audio. `loglikelihood` and `generate_until_multi_round` are refused with an error
naming the task: the plugin answers `generate_until` tasks.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from loguru import logger
from PIL import Image
from tqdm import tqdm

from tinylmm.api.commands import load
from tinylmm.data.templates import IMAGE_TOKEN
from tinylmm.errors import ConfigError, DataError
from tinylmm.models.generation import generate_batch

DEFAULT_MAX_NEW_TOKENS = 128
READ_KWARGS = {"max_new_tokens", "temperature", "do_sample", "top_p", "num_beams", "until"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TinyLMMChat(lmms):
    """`--model tinylmm`. model_args: `pretrained` (a checkpoint directory, e.g. RUN/final),
    `dtype` (float32 | bfloat16 | float16; default: as saved), `device` (default: cuda when
    there is one, else cpu); `--batch_size N` is how many requests share one generate call."""

    is_simple = False

    def __init__(
        self,
        pretrained: str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str | None = None,
        max_batch_size: int | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            names = ", ".join(sorted(unknown))
            known = "pretrained, dtype, device (and --batch_size)"
            raise ConfigError(f"lmms-eval model tinylmm: unknown model_args {names}; known: {known}")
        if not pretrained:
            raise ConfigError("lmms-eval model tinylmm needs --model_args pretrained=RUN/final (a checkpoint dir)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # lmms-eval would shard requests over ranks we never join
            raise ConfigError("lmms-eval model tinylmm runs in one process: launch lmms-eval without accelerate launch")
        self.batch_size = _batch_size(batch_size, max_batch_size)
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"lmms-eval model tinylmm: dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.processor = load(pretrained, dtype=DTYPES.get(dtype), device=self.device)
        self.model.eval()
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ lmms-eval's methods

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One answer per request, in the requests' order. Requests with the same generation
        kwargs are answered `batch_size` at a time (left-padded: generate_batch)."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[2], sort_keys=True, default=str)].append(i)
        answers: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="tinylmm answering")
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[2]
            options, until = self._generation_options(gen_kwargs)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                convs, images = zip(*(self._conversation(requests[i]) for i in chunk))
                texts = generate_batch(self.model, self.processor, list(convs), list(images), **options)
                for i, text in zip(chunk, texts):
                    answers[i] = _cut(text, until)
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), answers[i])
                bar.update(len(chunk))
        bar.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(_refusal("loglikelihood", requests))

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(_refusal("generate_until_multi_round", requests))

    # ------------------------------------------------------------------ requests -> tinylmm

    def _conversation(self, request: Instance):
        """A request -> ([(role, text) ...], [PIL images]) for generate_batch."""
        _ctx, doc_to_messages, _gen_kwargs, doc_id, task, split = request.args
        where = f"task {task}, {split} document {doc_id}"
        messages = doc_to_messages(self.task_dict[task][split][doc_id])
        return conversation(ChatMessages(messages=messages), where)

    def _generation_options(self, gen_kwargs: dict):
        """lmms-eval's generation kwargs -> generate_batch's keywords, and the stop strings."""
        ignored = sorted(set(gen_kwargs) - READ_KWARGS - self._warned)
        if ignored:
            logger.warning(f"tinylmm: generation kwargs not used: {', '.join(ignored)}")
            self._warned.update(ignored)
        options = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)}
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if temperature > 0 or gen_kwargs.get("do_sample"):
            options.update(do_sample=True, temperature=temperature or 1.0, top_p=float(gen_kwargs.get("top_p") or 1.0))
        if int(gen_kwargs.get("num_beams") or 1) > 1:
            options["num_beams"] = int(gen_kwargs["num_beams"])
        until = gen_kwargs.get("until") or []
        return options, [until] if isinstance(until, str) else list(until)


def conversation(messages: ChatMessages, where: str):
    """lmms-eval's chat messages -> tinylmm's turns [(human|gpt, text)] and the images, each
    image written as `<image>` in front of its turn's text. DataError naming `where` for what
    the model cannot take."""
    turns, images = [], []
    for message in messages.messages:
        if message.role == "system":
            raise DataError(f"{where}: a system message; tinylmm's template has its own system prompt")
        texts, found = [], []
        for part in message.content:
            if part.type == "text":
                texts.append(part.text)
            elif part.type == "image":
                found.append(_image(part.url, where))
            else:
                raise DataError(f"{where}: a {part.type} part; tinylmm answers about images and text only")
        text = "\n".join(texts)
        if found:
            text = IMAGE_TOKEN * len(found) + "\n" + text
        turns.append(("human" if message.role == "user" else "gpt", text))
        images += found
    if not turns or turns[-1][0] != "human":
        raise DataError(f"{where}: the messages must end with the user's")
    return turns, images


def _image(url, where: str) -> Image.Image:
    if isinstance(url, Image.Image):
        return url.convert("RGB")
    if isinstance(url, (str, os.PathLike)) and os.path.isfile(url):
        with Image.open(url) as im:
            return im.convert("RGB")
    raise DataError(f"{where}: an image that is neither a PIL image nor an image file: {url!r:.80}")


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _batch_size(batch_size, max_batch_size) -> int:
    if max_batch_size is not None or str(batch_size).startswith("auto"):
        raise ConfigError("lmms-eval model tinylmm: --batch_size auto is not supported; give a number (--batch_size 8)")
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        raise ConfigError(f"lmms-eval model tinylmm: --batch_size must be a number, not {batch_size!r}") from None
    if value < 1:
        raise ConfigError(f"lmms-eval model tinylmm: --batch_size must be at least 1, not {value}")
    return value


def _refusal(method: str, requests) -> str:
    tasks = sorted({str(r.task_name) for r in requests}) or ["?"]
    return (
        f"lmms-eval model tinylmm answers generate_until tasks only; {', '.join(tasks)} asks for {method} "
        "(choose the task's generation variant)"
    )
