"""One generation thread for the whole server: requests that arrive while it is busy are run
together, as one left-padded batch (models.generation.generate_tokens, eval's call too), and each row
is streamed and stopped on its own.

The model is only ever touched by this thread. Each row is followed in a transformers
StoppingCriteria, which sees every step's new token of every row before the next step runs
(transformers streams tokens to a streamer after the stop check, one step late on GPUs): it
decodes the row's text so far, hands the new piece to the row's callback, and tells
generation that the row is done at a stop token, at its own `max_tokens`, or when its client
went away. Rows of different sampling settings are never batched together.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tinylmm.data.processor import Processor
from tinylmm.models.generation import generate_tokens


@dataclass
class Job:
    """One request's generation. The callbacks run on the generation thread."""

    input_ids: torch.Tensor  # [1, n]
    pixel_values: torch.Tensor | None  # [images, 3, H, W] or None
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    on_text: Callable[[str], None]
    on_done: Callable[[str, int, BaseException | None], None]  # finish_reason, completion tokens, error
    cancelled: bool = False  # set by the request's side when its client disconnects
    ids: list[int] = field(default_factory=list)
    printed: int = 0
    done: bool = False

    @property
    def sampling(self) -> tuple[float, float]:
        return (self.temperature, self.top_p if self.temperature > 0 else 1.0)


class Batcher:
    """Runs submitted Jobs on one thread, up to `max_batch` at a time."""

    def __init__(self, model, processor: Processor, *, max_batch: int = 8, lock: threading.Lock | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.model, self.processor, self.max_batch = model, processor, max_batch
        self.lock = lock or threading.Lock()  # the tokenizer is shared with the request side
        self.batch_sizes: list[int] = []  # every batch run, in order (tests, logs)
        self.finish_reasons: list[str] = []  # every request's: stop | length | cancelled
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="tinylmm-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            while len(jobs) < self.max_batch:  # whatever queued up while the last batch ran
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.sampling, []).append(job)
            for group in groups.values():
                self._generate(group)

    def _generate(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return
        self.batch_sizes.append(len(jobs))
        tok = self.processor.tokenizer
        temperature, top_p = jobs[0].sampling
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
        rows = _Rows(jobs, self.processor.stop_token_ids, tok, self.lock, self.finish_reasons)
        error = None
        try:
            generate_tokens(
                self.model,
                self.processor,
                [{"input_ids": j.input_ids, "pixel_values": j.pixel_values} for j in jobs],
                max_new_tokens=max(j.max_tokens for j in jobs),
                stopping_criteria=StoppingCriteriaList([rows]),
                **sampling,
            )
        except Exception as e:  # noqa: BLE001 - reported to each request; the server goes on
            error = e
        for j in jobs:
            if not j.done:
                rows.finish(j, "length", error)


class _Rows(StoppingCriteria):
    """Per-row decoding and stopping, called by generate() after every step."""

    def __init__(self, jobs, stop_ids, tokenizer, lock, reasons):
        self.jobs, self.stop_ids, self.tokenizer, self.lock = jobs, set(stop_ids), tokenizer, lock
        self.reasons = reasons

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        for job, token in zip(self.jobs, new):
            if job.done:
                continue
            if job.cancelled:
                self.finish(job, "cancelled")
            elif token in self.stop_ids:
                job.ids.append(token)
                self.finish(job, "stop")
            else:
                job.ids.append(token)
                self._emit(job, final=False)
                if len(job.ids) >= job.max_tokens:
                    self.finish(job, "length")
        return torch.tensor([j.done for j in self.jobs], device=input_ids.device)

    def _emit(self, job: Job, *, final: bool) -> None:
        ids = [t for t in job.ids if t not in self.stop_ids]
        with self.lock:
            text = self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        if final or not text.endswith("\ufffd"):  # hold back an incomplete multi-byte character
            if len(text) > job.printed:
                job.on_text(text[job.printed :])
                job.printed = len(text)

    def finish(self, job: Job, reason: str, error: BaseException | None = None) -> None:
        if error is None:
            self._emit(job, final=True)
        job.done = True
        self.reasons.append(reason)
        job.on_done(reason, len(job.ids), error)
