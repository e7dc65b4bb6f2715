"""The benchmark registry. A benchmark is registered under its exact name and provides one
or both of:

run by a model (`tinylmm eval run`, and training's `eval.bench`):
    evaluate(model, processor, data, *, out, batch_size, max_new_tokens) -> summary
        answers its questions, scores them, writes the answers and scores to `out` (JSON)
        and returns the summary (at least `bench`, `n`, `accuracy`)
    data_for(model_dir, processor) -> Path
        its data when none is given: the run's own, or where it is installed or made
answered by a model into an answer file (`tinylmm eval run --data DIR`; eval/answering.py):
    questions(data) -> list[Question]
        the questions of LLaVA's question file in the benchmark folder `data`
    images: str | None
        where the layout keeps the images, relative to `data` (the script's --image-folder);
        None when the question file carries them (MMBench's TSV)
scoring an answer file (`tinylmm eval score`, no model):
    rules: tuple[str, ...]
        the answer rules it knows, the default (LLaVA's) first
    score(data, answers, rule) -> scores
        the answer file `answers` (LLaVA's answer format) scored against the benchmark folder
        `data` (LLaVA-1.5's eval layout): {"bench", "rule", "n", "metrics", ...}, fractions in 0-1
    judged = True, and score(data, answers, rule, *, judge)
        scored by a judge model (eval/judge.py: `judge.ask(messages, ...)`, cached replies)
    max_new_tokens: int
        the answer length its official script generates, when not the default 128
"""

from __future__ import annotations

from tinylmm.errors import ConfigError
from tinylmm.registry import Registry

BENCHMARKS: Registry = Registry("benchmark")

ABILITIES = {
    "evaluate": "be run on a model",
    "questions": "be answered into an answer file",
    "score": "score an answer file",
}


def benchmark_that_can(name: str, ability: str, where: str | None = None):
    """The benchmark `name`, which must provide `ability` ("evaluate", "questions" or "score")."""
    entry = BENCHMARKS.get(name, where)
    if not hasattr(entry, ability):
        able = sorted(n for n, b in BENCHMARKS.items() if hasattr(b, ability))
        raise ConfigError(
            f"benchmark '{name}'" + (f" in {where}" if where else "") + f" cannot {ABILITIES[ability]}; "
            f"those that can: {', '.join(able)}"
        )
    return entry
