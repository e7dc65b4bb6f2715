"""The library calls behind the CLI commands: everything the CLI does, Python can do."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tinylmm.config import ConfigError, load_resolved, parse_override, resolve


def train_run(preset: str = "toy", recipe: str = "share", overrides=(), *, output_dir=None, config=None,
              resume=None, evaluate: bool = True, console=None, tune: str | None = None,
              llm: str | None = None, vision: str | None = None):
    """Resolve the config (or reload a saved one) and train. Returns a `RunResult`.
    `tune="lora"|"qlora"` trains the LLM with adapters wherever the recipe trains it;
    `llm` / `vision` load that part from a local directory (or another hub id)."""
    from tinylmm.train.loop import train

    if resume is not None:
        if config is not None or overrides or tune is not None or llm is not None or vision is not None:
            raise ConfigError("--resume continues a run with its saved config; drop --config, --tune, "
                              "--llm, --vision and overrides")
        return train(resume_dir=resume, console=console, evaluate=evaluate)
    if config is not None:
        if tune is not None:
            raise ConfigError("--tune applies to a recipe; a saved --config already holds its stages' modes")
        if llm is not None or vision is not None:
            raise ConfigError("with --config, set the parts as overrides: model.llm.name_or_path=DIR ...")
        cfg, sources = _from_saved(Path(config), overrides)
    else:
        cfg, sources = resolve(preset, recipe, list(overrides), output_dir=None, tune=tune, llm=llm, vision=vision)
    if output_dir is not None:
        cfg.output_dir = str(output_dir)
        sources["output_dir"] = "cli"
    return train(cfg, sources, console=console, evaluate=evaluate)


def _from_saved(path: Path, overrides):
    from tinylmm.config import Layers, RunConfig, from_dict, to_dict, validate

    if not path.exists():
        raise FileNotFoundError(f"config file '{path}' does not exist")
    saved = to_dict(load_resolved(path))
    saved["output_dir"] = None  # a new run: a new directory unless one is given
    layers = Layers()
    layers.apply(saved, f"config:{path.name}")
    for o in overrides:
        key, value = parse_override(o)
        layers.set(key, value, "override")
    cfg = from_dict(RunConfig, layers.data)
    validate(cfg)
    return cfg, layers.sources


class ChatSession:
    """A multi-turn conversation with one checkpoint; the image goes with the first question
    asked after it is set."""

    def __init__(self, model_dir, *, max_new_tokens: int = 256, temperature: float = 0.0, **load_kwargs):
        from tinylmm import load

        self.model, self.processor = load(model_dir, **load_kwargs)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.reset()

    def reset(self) -> None:
        self.turns: list[tuple[str, str]] = []
        self.images: list[Image.Image] = []
        self.pending_image: Image.Image | None = None
        self.image_path: Path | None = None

    def set_image(self, path: Path) -> None:
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
        from tinylmm.generation import chat_reply

        if self.pending_image is not None:
            question = f"{IMAGE_TOKEN}\n{question}"
            self.images.append(self.pending_image)
            self.pending_image = None
        turns = self.turns + [("human", question)]
        kwargs = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {}
        answer = chat_reply(self.model, self.processor, turns, self.images, on_text=on_text,
                            max_new_tokens=self.max_new_tokens, **kwargs)
        self.turns = turns + [("gpt", answer)]
        return answer


def merge_checkpoint(src, out=None, *, full_precision_base: bool = False) -> Path:
    """Fold a checkpoint's LoRA adapters into its weights and write a self-contained full
    checkpoint (default: `<src>-merged` beside it). After QLoRA the adapters are added to
    the dequantized 4-bit base, the weights they were trained against, so the merged model
    answers as the trained one did; `full_precision_base` adds them to the original base."""
    from peft import PeftModel

    from tinylmm.models import adapters
    from tinylmm.models.lmm import load, read_meta
    from tinylmm.train.checkpoint import write_atomically

    src = Path(src)
    meta = read_meta(src)
    if not meta.get("llm_base") and not meta.get("vision_lora"):
        raise ValueError(f"'{src}' has no adapters to merge: it is a full checkpoint already")
    out = Path(out) if out is not None else src.resolve().with_name(src.resolve().name + "-merged")
    if out.exists():
        raise FileExistsError(f"'{out}' already exists; not overwriting it")
    model, processor = load(src)
    if adapters.is_peft(model.llm):
        if adapters.is_quantized(model.llm) and not full_precision_base:
            base = adapters.dequantized_base(model.llm, model.llm_base)
        else:
            base = adapters.load_llm(model.llm_base, quant=None)
        model.llm = PeftModel.from_pretrained(base, str(src / "llm")).merge_and_unload()
        model.llm_base = model.llm_quant = None
    if adapters.has_vision_lora(model):
        adapters.merge_vision_lora(model)
    write_atomically(out, lambda d: model.save(d, processor))
    return out


def evaluate_checkpoint(model_dir, bench: str = "shapes", *, out=None, data=None, batch_size: int = 32):
    """Score a checkpoint; returns (summary, results path)."""
    from tinylmm import load
    from tinylmm.config import BENCHMARKS, unknown

    if bench not in BENCHMARKS:
        raise unknown("benchmark", bench, BENCHMARKS)
    model_dir = Path(model_dir)
    model, processor = load(model_dir)
    if data is None:
        data = _shapes_data_for(model_dir, processor)
    out = Path(out) if out else model_dir.resolve().parent.parent / "eval" / f"{bench}.json"
    from tinylmm.eval.shapes import evaluate_shapes

    return evaluate_shapes(model, processor, Path(data), out=out, batch_size=batch_size), out


def _shapes_data_for(model_dir: Path, processor) -> Path:
    """The run's own shapes data if the checkpoint sits in a run directory, else a fresh set."""
    for parent in model_dir.resolve().parents:
        candidate = parent / "data" / "shapes"
        if (candidate / "eval.json").exists():
            return candidate
    from tinylmm.config import ShapesConfig
    from tinylmm.data.shapes import write_shapes_dataset

    s = ShapesConfig()
    root = Path.home() / ".cache" / "tinylmm" / f"shapes-{processor.image_processor.size}"
    return write_shapes_dataset(root, seed=s.seed, n_caption=s.n_caption, n_instruct=s.n_instruct,
                                n_eval=s.n_eval, image_size=processor.image_processor.size)["images"]
