"""`tinylmm eval`: `eval MODEL` answers a benchmark with a checkpoint, scores the answers and
prints the table; `eval run MODEL` only answers, into an answer file in LLaVA's answer format;
`eval score` scores an answer file, no model; `eval build-pope` builds POPE from COCO annotations.
An answer file and its scores sit side by side: <run>/eval/<bench>-answers.jsonl and
<run>/eval/<bench>-answers.scores.json by default (the built-in shapes: <run>/eval/shapes.json)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from tinylmm import api
from tinylmm.errors import ConfigError
from tinylmm.train.progress import Reporter

COMBINED = "answer-and-score"  # the hidden command that `tinylmm eval MODEL ...` is


class ModelOrCommand(TyperGroup):
    """`tinylmm eval MODEL ...` answers and scores: a first word that is neither a subcommand
    nor an option is the model directory, given to the hidden command COMBINED."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = [COMBINED, *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=ModelOrCommand,
    no_args_is_help=True,
    help="Evaluate. `eval MODEL --bench B --data DIR`: answer, score and print the table (shapes: no --data); "
    "`eval run MODEL`: only answer, into an answer file; `eval score`: score an answer file, no model.",
)


# options shared by the commands (one definition, one help text)
MODEL_DIR = typer.Argument(..., help="a checkpoint directory, e.g. runs/x/final")
BENCH = typer.Option("shapes", "--bench", "-b", help="benchmark name")
DATA = typer.Option(
    None, "--data", help="benchmark folder (LLaVA-1.5's eval layout; shapes: made on the fly if absent)"
)
IMAGES = typer.Option(None, "--images", help="image folder (default: where the layout keeps them, e.g. pope/val2014)")
ANSWERS = typer.Option(
    None,
    "--answers",
    help="answer file to write or resume, LLaVA's format (default <model_dir>/../eval/<bench>-answers.jsonl)",
)
BATCH_SIZE = typer.Option(None, help="questions per generation batch (shapes 32, else 8)")
MAX_NEW_TOKENS = typer.Option(
    None, help="answer length cap in tokens (shapes 8, LLaVA-Bench and MM-Vet 1024, else 128)"
)
RULE = typer.Option(None, "--rule", help="answer rule: llava (default) or lmms-eval where the benchmark has it")
JUDGE_URL = typer.Option(
    None, "--judge-url", help="LLaVA-Bench, MM-Vet: the judge's OpenAI-compatible API, e.g. https://api.openai.com/v1"
)
JUDGE_MODEL = typer.Option(
    None, "--judge-model", help="LLaVA-Bench, MM-Vet: the judge model (LLaVA's: gpt-4-0314; MM-Vet's: gpt-4-0613)"
)
JUDGE_KEY_ENV = typer.Option(
    None, "--judge-key-env", help="environment variable holding the judge's API key (default OPENAI_API_KEY)"
)


@app.command("run")
def evaluate(
    model_dir: Path = MODEL_DIR,
    bench: str = BENCH,
    out: Optional[Path] = typer.Option(
        None, "--out", help="shapes: results JSON (default <model_dir>/../eval/<bench>.json)"
    ),
    data: Optional[Path] = DATA,
    images: Optional[Path] = IMAGES,
    answers: Optional[Path] = ANSWERS,
    limit: Optional[int] = typer.Option(None, "--limit", help="answer only the first N questions"),
    batch_size: Optional[int] = BATCH_SIZE,
    max_new_tokens: Optional[int] = MAX_NEW_TOKENS,
):
    """Answer a benchmark with a checkpoint: shapes is scored at once, a --data folder answered into a file.

    The built-in shapes benchmark scores itself; a benchmark folder in LLaVA-1.5's eval layout
    (--data) is answered into an answer file in LLaVA's format, for `eval score`."""
    from rich.console import Console

    console = Console()
    if answers is None and images is None and limit is None and api.evaluates_itself(bench):
        evaluate_shapes(console, model_dir, bench, out, data, batch_size, max_new_tokens)
        return
    if out is not None:
        raise ConfigError("--out is the built-in shapes results file; an answer file goes to --answers")
    if data is None:
        raise ConfigError(f"--data is needed: the {bench} folder of LLaVA-1.5's eval layout")
    with answering_progress(console) as on_batch:
        report = api.answer_benchmark(
            model_dir,
            bench,
            data,
            answers=answers,
            images=images,
            limit=limit,
            batch_size=batch_size or 8,
            max_new_tokens=max_new_tokens,
            on_batch=on_batch,
        )
    print_answered(console, report)
    console.print(
        f"score it: tinylmm eval score --bench {bench} --data {data} --answers {report.answers}", soft_wrap=True
    )


@app.command(COMBINED, hidden=True)
def answer_and_score(
    model_dir: Path = MODEL_DIR,
    bench: str = BENCH,
    data: Optional[Path] = DATA,
    rule: Optional[str] = RULE,
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        help="scores JSON (default <answers stem>.scores.json beside the answers; shapes: its results JSON)",
    ),
    images: Optional[Path] = IMAGES,
    answers: Optional[Path] = ANSWERS,
    limit: Optional[int] = typer.Option(None, "--limit", help="answer only the first N questions (the rest: missing)"),
    batch_size: Optional[int] = BATCH_SIZE,
    max_new_tokens: Optional[int] = MAX_NEW_TOKENS,
    judge_url: Optional[str] = JUDGE_URL,
    judge_model: Optional[str] = JUDGE_MODEL,
    judge_key_env: Optional[str] = JUDGE_KEY_ENV,
):
    """`tinylmm eval MODEL`: answer a benchmark with a checkpoint, score the answers, print the table."""
    from rich.console import Console

    console = Console()
    if answers is None and images is None and limit is None and api.evaluates_itself(bench):
        if rule is not None:
            raise ConfigError(f"--rule: {bench} scores itself; the rule is for benchmarks scored from answer files")
        evaluate_shapes(console, model_dir, bench, out, data, batch_size, max_new_tokens)
        return
    if data is None:
        raise ConfigError(f"--data is needed: the {bench} folder of LLaVA-1.5's eval layout")
    with answering_progress(console) as on_batch:
        report, scores, path = api.evaluate_answers(
            model_dir,
            bench,
            data,
            rule=rule,
            out=out,
            answers=answers,
            images=images,
            limit=limit,
            batch_size=batch_size or 8,
            max_new_tokens=max_new_tokens,
            on_batch=on_batch,
            judge_url=judge_url,
            judge_model=judge_model,
            judge_key_env=judge_key_env,
        )
    print_answered(console, report)
    print_scores(console, scores, path)


def evaluate_shapes(console, model_dir, bench, out, data, batch_size, max_new_tokens) -> None:
    """A benchmark that scores itself (the built-in shapes): evaluated, its table printed."""
    result, path = api.evaluate_checkpoint(
        model_dir, bench, out=out, data=data, batch_size=batch_size or 32, max_new_tokens=max_new_tokens or 8
    )
    Reporter(console, True, Path("/dev/null")).eval_table(result)
    console.print(f"results: {path}")


def print_answered(console, report) -> None:
    console.print(
        f"{report.answered} question(s) answered, {report.skipped} already in the answer file, of {report.total}"
    )
    if report.missing_images:
        ids = report.missing_images
        console.print(
            f"[yellow]{len(ids)} question(s) not answered, their image is missing: {', '.join(ids[:10])}"
            + (f", ... ({len(ids) - 10} more)" if len(ids) > 10 else "")
        )
    console.print(f"answers: {report.answers}", soft_wrap=True)


@contextmanager
def answering_progress(console):
    """A progress bar for answering: questions done of those to ask, questions/s, ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"))
    with Progress(*columns, TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("answering", total=None, rate="")
        start = console.get_time()  # rich's clock (time.monotonic unless the console says), as its ETA's

        def on_batch(done: int, todo: int) -> None:
            rate = done / max(console.get_time() - start, 1e-9)
            progress.update(task, completed=done, total=todo, rate=f"{rate:.1f} questions/s")

        yield on_batch


@app.command("score")
def score(
    bench: str = typer.Option(..., "--bench", "-b", help="benchmark name (pope, scienceqa, gqa, ...)"),
    data: Path = typer.Option(
        ..., "--data", help="the benchmark's folder in LLaVA-1.5's layout (playground/data/eval/<bench>)"
    ),
    answers: Path = typer.Option(..., "--answers", help="answer file, JSON lines in LLaVA's answer format"),
    rule: Optional[str] = RULE,
    out: Optional[Path] = typer.Option(
        None, "--out", help="scores JSON (default <answers stem>.scores.json beside the answers)"
    ),
    judge_url: Optional[str] = JUDGE_URL,
    judge_model: Optional[str] = JUDGE_MODEL,
    judge_key_env: Optional[str] = JUDGE_KEY_ENV,
):
    """Score an answer file against a benchmark's official rule, without a model.

    LLaVA-Bench and MM-Vet are scored by a judge model (--judge-url, --judge-model); its replies
    are cached beside the scores (<scores stem>.judge.jsonl), so scoring again asks nothing twice."""
    from rich.console import Console

    scores, path = api.score_answers(
        bench,
        data,
        answers,
        rule=rule,
        out=out,
        judge_url=judge_url,
        judge_model=judge_model,
        judge_key_env=judge_key_env,
    )
    print_scores(Console(), scores, path)


def print_scores(console, scores: dict, path: Path) -> None:
    console.print(scores_table(scores))
    if scores.get("missing", {}).get("n"):
        m = scores["missing"]
        console.print(f"[yellow]{m['n']} question(s) had no answer and were scored wrong: {', '.join(m['ids'][:10])}")
    for key, what in (
        ("unparsed", "judge replies without LLaVA's score line, scored [-1, -1]"),
        ("fallback", "judge replies that never parsed, scored 0.0"),
    ):
        if scores.get(key, {}).get("n"):
            console.print(f"[yellow]{scores[key]['n']} {what}: {', '.join(map(str, scores[key]['ids'][:10]))}")
    if "judge" in scores:
        j = scores["judge"]
        console.print(
            f"judge {j['model']} at {j['url']}: {j['requests']} request(s), {j['cached']} from {j['replies']}"
        )
    console.print(f"scores: {path}")


GROUPS = ("splits", "subtasks", "subjects", "l2_categories", "answer_types")  # scores.json's per-part keys


def scores_table(scores: dict):
    """One row for the benchmark's metrics, then one per split/subtask/subject. A group's own
    figures (MME's acc, acc_plus, score) get columns of their own; the keys named in
    `points` are points (MME's), the rest fractions."""
    from rich.table import Table

    groups = [row for group in GROUPS for row in scores.get(group, {}).values()]
    metrics = list(scores["metrics"])
    own = dict.fromkeys(k for row in groups for k, v in row.items() if isinstance(v, (int, float)) and k != "n")
    metrics += [k for k in own if k not in metrics]
    points = set(scores.get("points", ()))

    def cell(m: str, v: float) -> str:
        return f"{v:.1f}" if m in points else f"{v:.1%}"

    title = f"{scores['bench']} ({scores['n']} questions, rule: {scores['rule']})"
    table = Table(title=title, caption=scores.get("note"))  # a note: what the scoring left out
    table.add_column("")
    table.add_column("n", justify="right")
    for m in metrics:
        table.add_column(m, justify="right")
    for group in GROUPS:
        if scores.get(group) and table.rows:
            table.add_section()  # a line between groups (MMBench: categories, then l2-categories)
        for name, row in scores.get(group, {}).items():
            table.add_row(name, str(row.get("n", "")), *(cell(m, row[m]) if m in row else "" for m in metrics))
    if table.rows:
        table.add_section()
    table.add_row(
        "[bold]total" if points else "[bold]mean" if scores.get("splits") else "[bold]overall",  # POPE's are means
        str(scores["n"]),
        *(f"[bold]{cell(m, scores['metrics'][m])}" if m in scores["metrics"] else "" for m in metrics),
    )
    return table


@app.command("build-pope")
def build_pope(
    annotations: Path = typer.Option(
        ..., "--annotations", help="COCO-format instance annotations (e.g. annotations/instances_val2014.json)"
    ),
    out: Path = typer.Option(..., "--out", help="the POPE folder to write (LLaVA-1.5's playground/data/eval/pope)"),
    images: int = typer.Option(500, "--images", help="images to sample (POPE's --img_num)"),
    questions_per_image: int = typer.Option(
        3, "--questions-per-image", help="objects asked per image and split, each with one absent (POPE's --sample_num)"
    ),
    seed: int = typer.Option(0, "--seed", help="seeds the image sample and the random negatives"),
):
    """Build POPE's random, popular and adversarial splits from COCO annotations, in LLaVA-1.5's layout."""
    from rich.console import Console

    built = api.build_pope(annotations, out, images=images, questions_per_image=questions_per_image, seed=seed)
    console = Console()
    per_split = ", ".join(f"{split} {n}" for split, n in built.questions.items())
    console.print(f"POPE: {built.images} images of {built.eligible} eligible, questions per split: {per_split}")
    if built.too_few:
        ids = ", ".join(map(str, built.too_few[:10])) + (", ..." if len(built.too_few) > 10 else "")
        console.print(
            f"[yellow]{len(built.too_few)} image(s) with fewer than {questions_per_image} objects left out, "
            f"as POPE leaves them out: {ids}"
        )
    written = f"{built.out / 'llava_pope_test.jsonl'}, {built.out / 'coco'}/coco_pope_*.json"
    console.print(f"written: {written}", soft_wrap=True)
    console.print(f"images: put COCO's val2014 at {built.out / 'val2014'}, or give `eval run --images`", soft_wrap=True)
