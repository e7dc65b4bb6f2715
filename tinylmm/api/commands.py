"""One function per command: everything the CLI does, Python can do (the CLI only parses
and prints). Each function imports the part of the house it needs when called, so that
`tinylmm --help`, `tinylmm ls` and `tinylmm zoo ls` start without the ML stack."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tinylmm.api.launch import is_main_process
from tinylmm.catalog import accelerate_configs, recipes, zoo
from tinylmm.errors import ConfigError, DataError, unknown

LISTINGS = ("presets", "recipes", "connectors", "templates", "benchmarks", "accelerate", "instruct")


def register_zoo(path: str | Path | None) -> list[str]:
    """The `--zoo FILE` option: add a user's presets (model_zoo.yaml's schema)."""
    return zoo.register(path) if path is not None else []


# Presets that keep their recipe's modes when --tune is not given: the toy trains on a CPU
# as written (its tests' literal losses); every other preset defaults to `--tune auto`.
RECIPE_MODES_BY_DEFAULT = ("toy",)


def resolve_config(
    preset: str = "toy",
    recipe: str = "share",
    overrides=(),
    *,
    tune: str | None = None,
    llm: str | None = None,
    vision: str | None = None,
    config: str | Path | None = None,
    device=None,
):
    """The validated run config of preset + recipe + overrides, or of a saved config.yaml
    (`config`) with overrides on top. Returns (config, sources). `tune`: full | lora |
    qlora | auto; unset: auto except for the toy. `device` (a tinylmm.memory.Device) is what
    auto plans for; default: the one this process would train on."""
    cfg, sources, _ = _resolve(
        preset, recipe, overrides, tune=tune, llm=llm, vision=vision, config=config, device=device
    )
    return cfg, sources


def _resolve(preset, recipe, overrides, *, tune, llm, vision, config, device):
    """(config, sources, the `--tune auto` choice or None)."""
    from tinylmm.config import TUNE_CHOICES, from_saved, load_resolved, resolve, validate

    if tune is not None and tune not in TUNE_CHOICES:
        raise unknown("--tune mode", tune, TUNE_CHOICES)
    if config is None:
        cfg, sources = resolve(
            preset, recipe, list(overrides), tune=None if tune == "auto" else tune, llm=llm, vision=vision
        )
        if tune == "auto" or (tune is None and cfg.preset not in RECIPE_MODES_BY_DEFAULT):
            from tinylmm.config.tune_auto import choose_tune
            from tinylmm.memory import detect_device

            cfg, sources, choice = choose_tune(cfg, sources, device or detect_device())
            validate(cfg)
            return cfg, sources, choice
        return cfg, sources, None
    if tune is not None:
        raise ConfigError("--tune applies to a recipe; a saved --config already holds its stages' modes")
    if llm is not None or vision is not None:
        raise ConfigError("with --config, set the parts as overrides: model.llm.name_or_path=DIR ...")
    path = Path(config)
    if not path.exists():
        raise FileNotFoundError(f"config file '{path}' does not exist")
    cfg, sources = from_saved(load_resolved(path), path.name, overrides)
    validate(cfg)
    return cfg, sources, None


def train_run(
    preset: str = "toy",
    recipe: str = "share",
    overrides=(),
    *,
    output_dir=None,
    config=None,
    resume=None,
    evaluate: bool = True,
    console=None,
    tune: str | None = None,
    llm: str | None = None,
    vision: str | None = None,
    device=None,
):
    """`tinylmm train`: resolve the config (or reload a saved one) and train. Returns a
    `RunResult`. `tune="lora"|"qlora"` trains the LLM with adapters wherever the recipe
    trains it; `"auto"` (the default but for the toy) picks per stage the first of full,
    lora, qlora that fits `device` (default: the one detected), announced on `console`;
    `llm` / `vision` load that part from a local directory (or another hub id)."""
    if resume is not None:
        if config is not None or overrides or tune is not None or llm is not None or vision is not None:
            raise ConfigError(
                "--resume continues a run with its saved config; drop --config, --tune, --llm, --vision and overrides"
            )
        from tinylmm.train.loop import train

        return train(resume_dir=resume, console=console, evaluate=evaluate)
    cfg, sources, choice = _resolve(
        preset, recipe, overrides, tune=tune, llm=llm, vision=vision, config=config, device=device
    )
    if choice is not None and is_main_process():  # once, before training
        from rich.console import Console

        (console or Console(stderr=True)).print(f"[bold]{choice.announcement()}[/bold]", highlight=False)
    if output_dir is not None:
        cfg.output_dir = str(output_dir)
        sources["output_dir"] = "cli"
    from tinylmm.train.loop import train  # after the config: a bad key is reported without loading torch's stack

    return train(cfg, sources, console=console, evaluate=evaluate)


def plan(
    preset: str = "toy",
    recipe: str = "share",
    overrides=(),
    *,
    tune: str | None = None,
    llm: str | None = None,
    vision: str | None = None,
    seq_len: int | None = None,
    micro_batch: int | None = None,
    logit_positions: int | None = None,
    budget: str | int = "24GB",
    device: str = "cuda",
):
    """`tinylmm plan`: the memory plan of every stage of the run (no weights needed), as
    `tinylmm train` would resolve it on `device` with `budget`: `--tune auto` (the default
    but for the toy) chooses for that device, and the plan's `tune_auto` says what it chose."""
    from tinylmm.memory import Device, parse_size, plan_run

    budget_bytes = parse_size(budget)
    target = Device(device, budget_bytes, f"the planned {device} device")
    cfg, _, choice = _resolve(preset, recipe, overrides, tune=tune, llm=llm, vision=vision, config=None, device=target)
    result = plan_run(
        cfg,
        seq_len=seq_len,
        micro_batch=micro_batch,
        budget_bytes=budget_bytes,
        device=device,
        logit_positions=logit_positions,
    )
    if choice is not None:
        result.tune_auto = choice.announcement()
    return result


def load(path, **kwargs):
    """A checkpoint directory -> (model, processor): a tinylmm checkpoint, or a
    TinyLLaVA_Factory model directory (converted in memory)."""
    from tinylmm.convert import tinyllava
    from tinylmm.models.assemble import load as load_checkpoint
    from tinylmm.models.checkpoint import is_checkpoint

    if not is_checkpoint(path) and tinyllava.is_tinyllava_dir(path):
        return tinyllava.load(path, **kwargs)
    return load_checkpoint(path, **kwargs)


def build(preset: str = "toy", overrides=(), **kwargs):
    """A preset's fresh (untrained) model and processor: pretrained parts loaded, the others
    initialised at random. `overrides`: key=value on the model spec, with or without the
    `model.` prefix (`connector.type=linear`, `model.vision.feature_layer=-1`). `kwargs` go
    to tinylmm.models.build_model (dtype, attn_implementation ...)."""
    from tinylmm.config import resolve
    from tinylmm.models.assemble import build_model

    zoo.get(preset)  # an unknown name fails here, with a suggestion
    keys = [o if o.split("=", 1)[0].strip().startswith("model.") else f"model.{o}" for o in overrides]
    cfg, _ = resolve(preset, "share", keys)  # the recipe does not touch the model
    return build_model(cfg.model, **kwargs)


class ChatSession:
    """`tinylmm chat`: a multi-turn conversation with one checkpoint; the image goes with
    the first question asked after it is set."""

    def __init__(self, model_dir, *, max_new_tokens: int = 256, temperature: float = 0.0, **load_kwargs):
        self.model, self.processor = load(model_dir, **load_kwargs)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.reset()

    def reset(self) -> None:
        self.turns: list[tuple[str, str]] = []
        self.images: list = []
        self.pending_image = None
        self.image_path: Path | None = None

    def set_image(self, path: Path) -> None:
        from PIL import Image

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image '{path}' does not exist")
        with Image.open(path) as im:
            image = im.convert("RGB")
        # A new image starts a new conversation: the model was trained on one image each.
        self.reset()
        self.pending_image, self.image_path = image, path

    def ask(self, question: str, on_text=None) -> str:
        from tinylmm.data.templates import IMAGE_TOKEN
        from tinylmm.models.generation import chat_reply

        if self.pending_image is not None:
            question = f"{IMAGE_TOKEN}\n{question}"
            self.images.append(self.pending_image)
            self.pending_image = None
        turns = self.turns + [("human", question)]
        kwargs = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {}
        answer = chat_reply(
            self.model,
            self.processor,
            turns,
            self.images,
            on_text=on_text,
            max_new_tokens=self.max_new_tokens,
            **kwargs,
        )
        self.turns = turns + [("gpt", answer)]
        return answer


def merge_checkpoint(src, out=None, *, full_precision_base: bool = False) -> Path:
    """`tinylmm merge`: fold a checkpoint's LoRA adapters into its weights and write a
    self-contained full checkpoint (default: `<src>-merged` beside it). After QLoRA the
    adapters are added to the dequantized 4-bit base, the weights they were trained against,
    so the merged model answers as the trained one did; `full_precision_base` adds them to
    the original base."""
    from tinylmm.files import write_atomically
    from tinylmm.models.checkpoint import read_meta

    src = Path(src)
    meta = read_meta(src)
    if not meta.get("llm_base") and not meta.get("vision_lora"):
        raise ValueError(f"'{src}' has no adapters to merge: it is a full checkpoint already")
    out = Path(out) if out is not None else src.resolve().with_name(src.resolve().name + "-merged")
    if out.exists():
        raise FileExistsError(f"'{out}' already exists; not overwriting it")
    model, processor = load(src)
    _fold_adapters(model, src, full_precision_base)
    write_atomically(out, lambda d: model.save(d, processor))
    return out


def _fold_adapters(model, src: Path, full_precision_base: bool = False) -> None:
    """Fold a loaded checkpoint's LoRA adapters (LLM and tower) into its weights, in place."""
    from tinylmm.models import adapters

    if adapters.is_peft(model.llm):
        model.llm = adapters.merged_llm(model, Path(src) / "llm", full_precision_base=full_precision_base)
        model.llm_base = model.llm_quant = None
    if adapters.has_vision_lora(model):
        adapters.merge_vision_lora(model)


EXPORT_FORMATS = ("hf-llava", "tinyllava")


def export_checkpoint(src, out, *, to: str = "hf-llava") -> tuple[Path, list[str]]:
    """`tinylmm export`: a checkpoint (adapters merged first) in another framework's layout:
    `hf-llava` (transformers' LlavaForConditionalGeneration, llava-hf's weight names: vLLM,
    SGLang) or `tinyllava` (TinyLLaVA_Factory's). `out` must not exist. Returns (out, notes)."""
    from tinylmm.convert import hf_llava, tinyllava_export
    from tinylmm.files import write_atomically

    exporters = {"hf-llava": hf_llava.export, "tinyllava": tinyllava_export.export}
    if to not in exporters:
        raise unknown("export format (--to)", to, exporters)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"'{out}' already exists; not overwriting it")
    model, processor = load(src)
    _fold_adapters(model, src)
    notes: list[str] = []
    write_atomically(out, lambda d: notes.extend(exporters[to](model.eval(), processor, d)))
    return out, notes


def evaluate_checkpoint(
    model_dir, bench: str = "shapes", *, out=None, data=None, batch_size: int = 32, max_new_tokens: int = 8
):
    """`tinylmm eval run`: score a checkpoint on a benchmark; returns (summary, results path)."""
    from tinylmm.eval.base import benchmark_that_can

    benchmark = benchmark_that_can(bench, "evaluate")
    model_dir = Path(model_dir)
    model, processor = load(model_dir)
    data = Path(data) if data is not None else benchmark.data_for(model_dir, processor)
    # <model_dir>/../eval/: beside the checkpoint as named (run/final -> run/eval, the loop's own)
    out = Path(out) if out else Path(os.path.abspath(model_dir)).parent / "eval" / f"{bench}.json"
    summary = benchmark.evaluate(model, processor, data, out=out, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return summary, out


def evaluates_itself(bench: str) -> bool:
    """Whether the benchmark `bench` runs on a model and scores itself (the built-in shapes)."""
    from tinylmm.eval.base import BENCHMARKS

    return hasattr(BENCHMARKS.get(bench), "evaluate")


def answer_benchmark(
    model_dir,
    bench: str,
    data,
    *,
    answers=None,
    images=None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    on_batch=None,
):
    """`tinylmm eval run --data`: answer a benchmark's question file (LLaVA-1.5's eval layout)
    with a checkpoint into an answer file in LLaVA's format, resuming one already begun.
    `answers` defaults to <model_dir>/../eval/<bench>-answers.jsonl, `images` to the layout's
    image folder; `limit`: only the first N questions; `max_new_tokens`: the benchmark's own
    (LLaVA-Bench and MM-Vet 1024, as LLaVA's model_vqa.py) else 128. Returns the AnswerReport."""
    from tinylmm.eval.answering import answer_questions
    from tinylmm.eval.base import benchmark_that_can

    benchmark = benchmark_that_can(bench, "questions")
    data = Path(data)
    if not data.is_dir():
        raise DataError(
            f"missing {data}: expected the {bench} folder of LLaVA-1.5's eval layout (playground/data/eval/{bench}/)"
        )
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if benchmark.images is None and images is not None:  # its question file carries the images (MMBench)
        raise ConfigError(f"--images: the {bench} question file carries its images; leave --images out")
    questions = benchmark.questions(data)[:limit]
    images = Path(images) if images is not None else data / (benchmark.images or "")
    if not images.is_dir() and any(q.image is not None for q in questions):
        raise DataError(f"missing {images}: expected the {bench} images (--images, or '{benchmark.images}' in {data})")
    model_dir = Path(model_dir)
    run_side = Path(os.path.abspath(model_dir)).parent
    answers = Path(answers) if answers else run_side / "eval" / f"{bench}-answers.jsonl"
    model, processor = load(model_dir)
    return answer_questions(
        model.eval(),
        processor,
        questions,
        images,
        answers,
        model_id=f"{run_side.name}/{model_dir.name}",
        batch_size=batch_size,
        max_new_tokens=max_new_tokens or getattr(benchmark, "max_new_tokens", 128),
        on_batch=on_batch,
    )


def _check_judge(bench: str, benchmark, judge_url, judge_model, judge_key_env) -> None:
    """Judge flags go with the judge-scored benchmarks (LLaVA-Bench, MM-Vet), and those need them."""
    from tinylmm.eval.base import BENCHMARKS

    judged = getattr(benchmark, "judged", False)
    given = {"--judge-url": judge_url, "--judge-model": judge_model, "--judge-key-env": judge_key_env}
    if not judged and any(v is not None for v in given.values()):
        names = ", ".join(n for n, b in BENCHMARKS.items() if getattr(b, "judged", False))
        flags = ", ".join(f for f, v in given.items() if v is not None)
        raise ConfigError(f"{flags}: {bench} is not scored by a judge model (those that are: {names})")
    if judged and (judge_url is None or judge_model is None):
        needed = " and ".join(f for f in ("--judge-url", "--judge-model") if given[f] is None)
        raise ConfigError(
            f"{bench} is scored by a judge model: {needed} needed (an OpenAI-compatible chat-completions "
            f"endpoint, e.g. https://api.openai.com/v1, and its model; the key is read from "
            f"${judge_key_env or 'OPENAI_API_KEY'}, --judge-key-env names another variable)"
        )


def score_answers(
    bench: str,
    data,
    answers,
    *,
    rule: str | None = None,
    out=None,
    judge_url: str | None = None,
    judge_model: str | None = None,
    judge_key_env: str | None = None,
):
    """`tinylmm eval score`: an answer file (LLaVA's answer format) scored against a benchmark
    folder in LLaVA-1.5's eval layout, no model; returns (scores, scores path). The rule is the
    benchmark's first (LLaVA's) unless named; scores go to `out`, by default beside the answers
    as <answers stem>.scores.json. The judge-scored benchmarks (LLaVA-Bench, MM-Vet) ask the
    model `judge_model` at the OpenAI-compatible endpoint `judge_url`, its key read from the
    environment variable `judge_key_env` (OPENAI_API_KEY), and cache its replies beside the
    scores in <scores stem>.judge.jsonl."""
    from tinylmm.eval.base import benchmark_that_can

    benchmark = benchmark_that_can(bench, "score")
    rule = rule or benchmark.rules[0]
    if rule not in benchmark.rules:
        raise unknown(f"answer rule for {bench}", rule, benchmark.rules)
    _check_judge(bench, benchmark, judge_url, judge_model, judge_key_env)
    judged = getattr(benchmark, "judged", False)
    data, answers = Path(data), Path(answers)
    if not data.is_dir():
        raise DataError(
            f"missing {data}: expected the {bench} folder of LLaVA-1.5's eval layout (playground/data/eval/{bench}/)"
        )
    out = Path(out) if out else answers.with_name(f"{answers.stem}.scores.json")
    if judged:
        from tinylmm.eval.judge import DEFAULT_KEY_ENV, judge_from_env

        replies = out.with_name(out.name.removesuffix(".json").removesuffix(".scores") + ".judge.jsonl")
        judge = judge_from_env(judge_url, judge_model, replies, key_env=judge_key_env or DEFAULT_KEY_ENV)
        scores = benchmark.score(data, answers, rule, judge=judge)
        scores["judge"] = judge.report()
    else:
        scores = benchmark.score(data, answers, rule)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(scores, indent=2) + "\n")
    return scores, out


def evaluate_answers(
    model_dir,
    bench: str,
    data,
    *,
    rule: str | None = None,
    out=None,
    answers=None,
    images=None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    on_batch=None,
    judge_url: str | None = None,
    judge_model: str | None = None,
    judge_key_env: str | None = None,
):
    """`tinylmm eval MODEL --data`: `answer_benchmark`, then `score_answers` on its answer file
    (scores by default beside it, <answers stem>.scores.json). The rule and the judge flags are
    checked before any question is asked. Returns (AnswerReport, scores, scores path)."""
    from tinylmm.eval.base import benchmark_that_can

    benchmark = benchmark_that_can(bench, "score")
    if rule is not None and rule not in benchmark.rules:
        raise unknown(f"answer rule for {bench}", rule, benchmark.rules)
    _check_judge(bench, benchmark, judge_url, judge_model, judge_key_env)
    report = answer_benchmark(
        model_dir,
        bench,
        data,
        answers=answers,
        images=images,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        on_batch=on_batch,
    )
    judge = {"judge_url": judge_url, "judge_model": judge_model, "judge_key_env": judge_key_env}
    scores, path = score_answers(bench, data, report.answers, rule=rule, out=out, **judge)
    return report, scores, path


def build_pope(annotations, out, *, images: int = 500, questions_per_image: int = 3, seed: int = 0):
    """`tinylmm eval build-pope`: POPE's three splits sampled from COCO-format instance
    annotations, written as LLaVA-1.5's POPE folder `out`. Returns the PopeBuild report."""
    from tinylmm.eval.pope_builder import build_pope as build

    return build(annotations, out, images=images, questions_per_image=questions_per_image, seed=seed)


def plot_run(run_dir) -> list[Path]:
    """`tinylmm plot`: redraw a run's pictures from its metrics.jsonl (plots/loss.png and
    plots/eval-<bench>.png per benchmark evaluated). Returns the paths written."""
    from tinylmm.train.plots import redraw

    return redraw(run_dir)


def convert_checkpoint(src, out, *, source: str = "tinyllava", tokenizer=None, template: str | None = None):
    """`tinylmm convert`: another framework's checkpoint as a tinylmm one. Returns (out, notes)."""
    from tinylmm.convert import tinyllava

    converters = {"tinyllava": tinyllava.convert}
    if source not in converters:
        raise unknown("checkpoint source (--from)", source, converters)
    return converters[source](src, out, tokenizer=tokenizer, template=template)


def listing(kind: str) -> list[tuple[str, str]]:
    """`tinylmm ls KIND`: (name, one line) of what is available."""
    if kind not in LISTINGS:
        raise unknown("listing", kind, LISTINGS)
    if kind == "presets":
        return [(p.name, p.description) for p in zoo.presets().values()]
    if kind == "recipes":
        return [(n, recipes.load_recipe(n).description) for n in recipes.shipped()]
    if kind == "accelerate":
        return [(n, accelerate_configs.description(p)) for n, p in accelerate_configs.shipped().items()]
    if kind == "templates":
        from tinylmm.data.templates import describe_templates

        return describe_templates()
    if kind == "instruct":
        from tinylmm.data import instructize

        return [(n, instructize.describe(p)) for n, p in instructize.shipped().items()]
    if kind == "connectors":
        from tinylmm.models.connectors import CONNECTORS
        from tinylmm.models.connectors.base import describe

        return [(n, describe(c)) for n, c in CONNECTORS.items()]
    from tinylmm.eval import BENCHMARKS

    return [(n, (b.__doc__ or "").strip().splitlines()[0]) for n, b in BENCHMARKS.items()]


def copy_recipe(name: str, dest) -> Path:
    """`tinylmm cp`: a shipped recipe copied to `dest` for editing; never overwrites."""
    return recipes.copy_recipe(name, dest)


def copy_shipped(name: str, dest) -> tuple[str, Path]:
    """`tinylmm cp NAME DEST`: a shipped recipe, accelerate config or instruction template file
    copied for editing -> (what it is, the copy). The sets of names never overlap."""
    from tinylmm.data import instructize

    if name in accelerate_configs.shipped():
        return "accelerate config", accelerate_configs.copy(name, dest)
    if name in instructize.shipped():
        return "instruction templates", instructize.copy_templates(name, dest)
    if name in recipes.shipped() or Path(name).suffix in (".yaml", ".yml"):
        return "recipe", recipes.copy_recipe(name, dest)
    shipped = [*recipes.shipped(), *accelerate_configs.shipped(), *instructize.shipped()]
    raise unknown("recipe, accelerate config or instruction templates", name, shipped)
