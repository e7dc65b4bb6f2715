"""One model assembly: every TinyLMM is put together by `assemble`, whether its parts come
from a preset (`build_model`), a checkpoint (`load`), TinyLLaVA_Factory's weights
(tinylmm/convert/tinyllava.py) or nowhere at all (the `meta` device: parameter counts and
the memory planner).

The order is fixed, so a seed gives the same weights wherever the model is built: the
vision tower (by its backend), the LLM, the embedding grown for `<image>`, the connector
between the two.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tinylmm.data.processor import ImageProcessor, Processor, ensure_image_token
from tinylmm.data.templates import IMAGE_TOKEN
from tinylmm.models import adapters, checkpoint
from tinylmm.models.arch import meta_llm, tokenizer_len
from tinylmm.models.connectors import build_connector
from tinylmm.models.llm import build_llm, build_tokenizer
from tinylmm.models.lmm import TinyLMM
from tinylmm.models.loading import quiet_libraries
from tinylmm.models.vision import backend_of
from tinylmm.schema import LoraSpec, ModelSpec, QuantSpec, VisionSpec, from_dict


def assemble(
    spec: ModelSpec,
    *,
    device=None,
    tokenizer=None,
    llm=None,
    tower=None,
    dtype=None,
    llm_dtype=None,
    vision_dtype=None,
    attn_implementation: str = "sdpa",
) -> TinyLMM:
    """A TinyLMM of `spec`. A part given (`llm`, `tower`: a checkpoint's, TinyLLaVA's) is used
    as it is; the others are built from the spec: with their weights (from_pretrained) or at
    random (an inline config), or on device `meta` from their architecture configs, reading
    nothing. An LLM built here grows its embedding to the tokenizer's length (on `meta`: the
    length known offline). `llm_dtype` / `vision_dtype` (default `dtype`) load a part
    directly in that dtype. `model.notes` says what the assembly decided."""
    on_meta = torch.device(device or "cpu").type == "meta"
    if tower is None or llm is None:
        torch.manual_seed(spec.seed)  # the connector's (and a toy's) initialisation is reproducible
    notes = []
    if tower is None:
        tower = backend_of(spec.vision).build(
            spec.vision, device=device, dtype=vision_dtype or dtype, attn_implementation=attn_implementation
        )
    if llm is None:
        llm = (
            meta_llm(spec.llm)
            if on_meta
            else build_llm(spec.llm, dtype=llm_dtype or dtype, attn_implementation=attn_implementation)
        )
        if tokenizer is not None:
            n_tok, source = len(tokenizer), "the tokenizer"
        else:
            n_tok, source = tokenizer_len(spec.llm)
        rows = llm.get_input_embeddings().num_embeddings
        if n_tok is None:
            notes.append(source)
        elif n_tok > rows:
            llm.resize_token_embeddings(n_tok, mean_resizing=False)
            notes.append(f"embedding grown {rows:,} -> {n_tok:,} rows for <image> ({source})")
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        connector = build_connector(spec.connector, tower.hidden_size, llm.config.hidden_size, tower.num_patches)
    if dtype is not None:
        connector.to(dtype)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if tokenizer is not None else -1
    model = TinyLMM(tower, connector, llm, image_id, spec)
    model.notes += notes
    return model


def image_processor_for(spec: VisionSpec, tower) -> ImageProcessor:
    """The preprocessing a tower expects, as its backend says."""
    return backend_of(spec).image_processor(spec, tower)


def build_model(
    spec: ModelSpec, *, attn_implementation: str = "sdpa", dtype=None, llm_dtype=None, vision_dtype=None
) -> tuple[TinyLMM, Processor]:
    """A preset's model and processor: pretrained parts via from_pretrained, inline configs at random."""
    tokenizer = build_tokenizer(spec.llm)
    ensure_image_token(tokenizer)
    model = assemble(
        spec,
        tokenizer=tokenizer,
        dtype=dtype,
        llm_dtype=llm_dtype,
        vision_dtype=vision_dtype,
        attn_implementation=attn_implementation,
    )
    processor = Processor(
        tokenizer, image_processor_for(spec.vision, model.vision), spec.template, model.num_image_tokens
    )
    return model, processor


def build_processor(spec: ModelSpec) -> Processor:
    """A preset's processor (its tokenizer, image processor, template and visual tokens per
    image) without its weights: the model is assembled on `meta` to count the tokens."""
    tokenizer = build_tokenizer(spec.llm)
    ensure_image_token(tokenizer)
    model = assemble(spec, device="meta", tokenizer=tokenizer)
    return Processor(tokenizer, image_processor_for(spec.vision, model.vision), spec.template, model.num_image_tokens)


def load(
    path: str | Path, *, attn_implementation: str = "sdpa", dtype=None, device=None, load_4bit: bool = False
) -> tuple[TinyLMM, Processor]:
    """Load a checkpoint directory written by `TinyLMM.save` (e.g. runs/x/final): a full
    one, or one whose LLM is a LoRA/QLoRA adapter on the run's base. `load_4bit` loads the
    LLM (the base, under an adapter) in 4-bit NF4 for inference in less memory."""
    quiet_libraries()
    path = Path(path)
    meta = checkpoint.read_meta(path)
    spec = from_dict(ModelSpec, meta["model"], str(path / checkpoint.META))
    remote = spec.llm.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), trust_remote_code=remote)
    quant = from_dict(QuantSpec, meta["llm_quantization"]) if meta.get("llm_quantization") else None
    if load_4bit and (quant is None or quant.bits != 4):
        quant = QuantSpec()
    base = checkpoint.llm_base(path, meta)
    if meta["format"] == "tinylmm/1":
        llm = checkpoint.load_v1_llm(path, quant, attn_implementation, dtype, device)
    elif base is not None:
        from peft import PeftModel  # optional: adapter checkpoints only

        llm = adapters.load_llm(
            base,
            quant=quant,
            device=device,
            attn_implementation=attn_implementation,
            dtype=dtype,
            trust_remote_code=remote,
        )
        llm = PeftModel.from_pretrained(llm, str(path / "llm"))
    else:
        llm = adapters.load_llm(
            path / "llm",
            quant=quant,
            device=device,
            attn_implementation=attn_implementation,
            dtype=dtype,
            trust_remote_code=remote,
        )
    tower = backend_of(spec.vision).load(path / "vision", spec.vision, attn_implementation)
    model = assemble(spec, tokenizer=tokenizer, llm=llm, tower=tower)
    if base is not None:
        model.llm_base, model.llm_quant = base, quant
    if meta.get("vision_lora"):
        adapters.attach_vision_lora(model, from_dict(LoraSpec, meta["vision_lora"]))
    checkpoint.restore_parts(model, path, llm_too=False)
    if dtype is not None:
        for part in (model.vision, model.connector):
            part.to(dtype)
    if device is not None:
        model.to(device)
    processor = Processor(tokenizer, ImageProcessor.load(path), spec.template, model.num_image_tokens)
    return model.eval(), processor
