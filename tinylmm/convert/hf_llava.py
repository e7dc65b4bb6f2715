"""tinylmm models -> transformers' LLaVA (`tinylmm export --to hf-llava OUT`).

OUT loads in plain transformers, with no tinylmm import:

    model = AutoModelForImageTextToText.from_pretrained(OUT)     # LlavaForConditionalGeneration
    processor = AutoProcessor.from_pretrained(OUT)               # LlavaProcessor

and is laid out as the llava-hf checkpoints (llava-hf/llava-1.5-7b-hf) that vLLM and SGLang
read:

    config.json               model_type "llava": vision_config (the tower as tinylmm keeps it,
                              cut after the feature layer, so vision_feature_layer is -1),
                              text_config (with its `architectures`, which vLLM's LLaVA uses to
                              pick the language model), image_token_index (the tokenizer's
                              `<image>`), vision_feature_select_strategy, projector_hidden_act,
                              multimodal_projector_bias, image_seq_length
    model.safetensors         language_model.model.*, language_model.lm_head.* (left out when
                              tied), vision_tower.vision_model.*, multi_modal_projector.linear_{1,2}.*
    generation_config.json    the stop tokens of the model's template (end of turn, and eos)
    processor_config.json     LlavaProcessor: patch_size, num_additional_image_tokens, the
                              selection, and the image processor (LlavaImageProcessor), which
                              preprocessor_config.json holds too (the classic layout)
    chat_template.jinja       the model's conversation format; the tokenizer (saved by
                              transformers, its dropped flags added and its reload checked:
                              data/tokenizer_files.py)

The weight names are the pre-v4.52 llava-hf ones. transformers 5 renames them on load
(conversion_mapping.py, "llava": `^language_model.lm_head` -> `lm_head`, `^language_model`
-> `model.language_model`, `^vision_tower` -> `model.vision_tower`, `^multi_modal_projector`
-> `model.multi_modal_projector`; "LlavaModel": `^language_model.model` -> `language_model`;
"CLIPVisionModel" (SiglipVisionModel too): the `vision_model` prefix removed). A
LlavaForConditionalGeneration built in memory and saved by transformers 5 gets
`vision_tower.embeddings.*`, without `vision_model.` (measured: tests/test_export.py), which
vLLM's loader does not map: vLLM's llava.py `hf_to_vllm_mapper` maps `model.vision_tower.` to
`vision_tower.`, and its CLIPVisionModel / SiglipVisionModel hold the transformer under
`vision_model` (clip.py, siglip.py). So the weights are written here, not by save_pretrained.

Pad to square. LLaVA-1.5 pads with the mean colour (`expand2square(image, tuple(int(x*255)
for x in image_processor.image_mean))`); transformers' LlavaImageProcessor does the same
when `do_pad` is set ("Apply pad_to_square first if needed (before resize)", with
`background_color = tuple(int(x * 255) for x in image_mean)` and the image centred,
offsets floored), then resizes (PIL bicubic in its PIL backend), centre-crops, rescales by
1/255 and normalises: tinylmm's ImageProcessor step for step. transformers picks its
torchvision backend where torchvision is installed; its bicubic resize is torchvision's, not
PIL's, so pixel values equal tinylmm's to 1e-5 with `backend="pil"` (the default here,
where torchvision is absent).

What LLaVA cannot hold is refused (ExportError names it and why):
- an open_clip or DINOv2 tower: LLaVA's vision_config is a transformers CLIP or SigLIP
  model (vLLM's llava.py builds only CLIP, SigLIP and Pixtral towers);
- a connector other than mlp2x_gelu: LlavaMultiModalProjector is Linear-act-Linear (`linear`
  would need an identity act: transformers' ACT2FN has "linear", vLLM's get_act_fn does not
  (layers/activation.py: gelu, gelu_fast, gelu_new, gelu_pytorch_tanh, relu, relu2, silu,
  quick_gelu));
- an LM head with a bias (Phi-2): LlavaForConditionalGeneration's lm_head is
  `nn.Linear(..., bias=False)`;
- a template of captions only (pretrain): no conversation to render.
Exported with a warning stating the logit difference measured on the model (Gemma-2):
- the final logit soft-cap: LlavaForConditionalGeneration runs `self.lm_head(hidden_states)`
  and never the text model's `final_logit_softcapping` (vLLM's Gemma2 logits processor does
  soft-cap). tanh is monotonic, so greedy answers are the same;
- the embedding scale: transformers 5 scales token embeddings inside the embedding module
  (Gemma2TextScaledWordEmbedding), so visual tokens are not scaled, as in tinylmm; vLLM's
  Gemma2Model multiplies every input embedding by sqrt(hidden_size) in forward
  (`hidden_states *= self.normalizer`), visual tokens included.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from tinylmm.data.templates import IMAGE_TOKEN, ChatTemplate, Template
from tinylmm.data.templates.core import FIXED_DATE  # the date tinylmm's `auto` template renders with
from tinylmm.data.tokenizer_files import complete_saved
from tinylmm.errors import ConfigError

CONNECTORS = {"mlp2x_gelu": ("mlp.0.", "mlp.2.")}  # ours -> LLaVA's linear_1, linear_2
VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
RESAMPLE = {"bicubic": 3, "bilinear": 2}  # PIL's numbers, as preprocessor_config.json stores them


class ExportError(ConfigError):
    """A model the target format cannot represent; the message says what and why."""


# --------------------------------------------------------------------------- checks


def check(model, processor) -> None:
    """Refuse what LLaVA cannot hold (see the module docstring)."""
    backend = model.spec.vision.backend
    if backend != "transformers":
        raise ExportError(
            f"the vision tower is an {backend} tower ({model.spec.vision.name_or_path}): transformers' LLaVA "
            f"and vLLM's take a transformers CLIP or SigLIP tower only"
        )
    vtype = model.vision.config.model_type
    if vtype not in VISION_TYPES:
        raise ExportError(
            f"the vision tower is a {vtype} model: transformers' LLaVA export takes {' or '.join(VISION_TYPES)} "
            "(vLLM's LLaVA builds only CLIP, SigLIP and Pixtral towers)"
        )
    if model.spec.connector.type not in CONNECTORS:
        raise ExportError(
            f"connector '{model.spec.connector.type}' has no LLaVA equivalent: LlavaMultiModalProjector is "
            "Linear-GELU-Linear (mlp2x_gelu); one linear layer would need an identity activation, which vLLM's "
            "get_act_fn does not have"
        )
    head = model.llm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ExportError(
            f"the LLM's LM head has a bias ({type(model.llm).__name__}, e.g. Phi-2): LLaVA's lm_head has none, "
            "so its logits would differ; export it with --to tinyllava instead"
        )
    if processor.template.caption_only:
        raise ExportError(f"template '{processor.template_name}' is for captions only: no chat format to export")
    image_processor_config(processor.image_processor)  # raises on a resize mode LLaVA lacks


def embed_scale(model) -> float:
    """The factor the LLM's embedding module multiplies token embeddings by (Gemma: sqrt(d))."""
    return float(getattr(model.llm.get_input_embeddings(), "scalar_embed_scale", 1.0))


# --------------------------------------------------------------------------- config


def select_strategy(model) -> str:
    """LLaVA's `default` drops token 0 (CLIP's CLS, our `patch`; our `drop_first` on
    SigLIP), `full` keeps every token."""
    return "default" if model.vision.drop_first else "full"


def text_config(model) -> dict:
    cfg = model.llm.config.to_dict()
    cfg["architectures"] = [type(model.llm).__name__]  # vLLM's LLaVA picks the LM class by it
    for key in ("_name_or_path", "transformers_version", "auto_map"):
        cfg.pop(key, None)
    return cfg


def vision_config(model) -> dict:
    cfg = model.vision.config.to_dict()
    if cfg["model_type"] == "siglip_vision_model":
        cfg["vision_use_head"] = False  # the pooling head is cut (vLLM builds one unless told)
    for key in ("_name_or_path", "transformers_version", "architectures"):
        cfg.pop(key, None)
    return cfg


def llava_config(model, image_token_id: int, vocab_size: int) -> dict:
    text = text_config(model)
    text["vocab_size"] = vocab_size
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision_config(model),
        "text_config": text,
        "image_token_index": image_token_id,
        "image_seq_length": model.num_image_tokens,
        "vision_feature_layer": -1,  # the tower is saved cut after its feature layer
        "vision_feature_select_strategy": select_strategy(model),
        "projector_hidden_act": "gelu",  # nn.GELU(): the exact erf form, ACT2FN["gelu"]
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(text.get("tie_word_embeddings", False)),
        "dtype": str(_dtype(model)).removeprefix("torch."),
    }


def _dtype(model) -> torch.dtype:
    return model.llm.get_input_embeddings().weight.dtype


# --------------------------------------------------------------------------- weights


def llava_weights(model, image_token_id: int) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """(state dict in llava-hf names, vocab size, notes). Everything in the LLM's dtype."""
    dtype, notes = _dtype(model), []
    out: dict[str, torch.Tensor] = {}
    tied = bool(getattr(model.llm.config, "tie_word_embeddings", False))
    llm_state = model.llm.state_dict()
    for key, value in llm_state.items():
        if key == "lm_head.weight" and tied:
            continue  # stored once, as transformers saves a tied head
        if not key.startswith(("model.", "lm_head.")):
            raise ExportError(f"the LLM's weight '{key}' is neither under model.* nor lm_head.*: not a LLaVA layout")
        out["language_model." + key] = value
    vocab = llm_state["model.embed_tokens.weight"].shape[0]
    if image_token_id >= vocab:  # an imported model whose table lacks <image> (TinyLLaVA's -200 placeholder)
        grow = image_token_id + 1 - vocab
        for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            if key in out:
                out[key] = torch.cat([out[key], out[key].new_zeros(grow, out[key].shape[1])])
        notes.append(
            f"embedding grown {vocab} -> {image_token_id + 1} rows with zeros for <image> (id {image_token_id}), "
            "which LLaVA looks up before replacing it; its logit is 0"
        )
        vocab = image_token_id + 1
    for key, value in model.vision.model.state_dict().items():
        if key.endswith("position_ids"):
            continue
        out["vision_tower.vision_model." + key.removeprefix("vision_model.")] = value
    # Cut by tinylmm (never used for the features); transformers' tower has one, vLLM skips it.
    width = model.vision.hidden_size
    out["vision_tower.vision_model.post_layernorm.weight"] = torch.ones(width)
    out["vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(width)
    first, second = CONNECTORS[model.spec.connector.type]
    for key, value in model.connector.state_dict().items():
        name = key.replace(first, "linear_1.").replace(second, "linear_2.")
        out["multi_modal_projector." + name] = value
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in out.items()}, vocab, notes


# --------------------------------------------------------------------------- processor


def image_processor_config(ip) -> dict:
    """transformers' LlavaImageProcessor settings equal to tinylmm's ImageProcessor `ip`."""
    s = ip.size
    if ip.pad_to_square or ip.resize == "squash":  # a padded image is square: a plain resize
        resize = {"size": {"height": s, "width": s}, "do_center_crop": False}
    elif ip.resize == "shortest_floor":  # transformers' own rule: shortest edge, crop offset floored
        resize = {"size": {"shortest_edge": s}, "do_center_crop": True, "crop_size": {"height": s, "width": s}}
    else:
        raise ExportError(
            f"the image processor's resize mode '{ip.resize}' (open_clip's) has no LlavaImageProcessor equivalent"
        )
    return {
        "image_processor_type": "LlavaImageProcessor",
        "do_convert_rgb": True,
        "do_pad": ip.pad_to_square,
        "do_resize": True,
        "resample": RESAMPLE[ip.interpolation],
        **resize,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(ip.image_mean),
        "image_std": list(ip.image_std),
    }


# The prelude every exported chat template opens with: transformers' multimodal messages
# (content: a string, or a list of {"type": "image"} / {"type": "text", "text": ...} parts) to
# tinylmm's turns: a user turn's images first, then "\n" and its text, stripped (tinylmm's
# `human_text`); an answer's text parts joined. SEPARATOR: see `image_separator`.
_PRELUDE = """\
{%- set ns = namespace(turns=[]) -%}
{%- for m in messages -%}
  {%- if m.content is string -%}
    {%- set n = m.content.count('<image>') -%}{%- set text = m.content.replace('<image>', '') -%}
  {%- else -%}
    {%- set n = m.content | selectattr('type', 'equalto', 'image') | list | length -%}
    {%- set text = m.content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}
    {%- set n = n + text.count('<image>') -%}{%- set text = text.replace('<image>', '') -%}
  {%- endif -%}
  {%- if m.role == 'user' and n > 0 -%}
    {%- set text = ('<image>' * n) + SEPARATOR + (('\\n' + text.strip()) if text.strip() else '') -%}
  {%- elif m.role == 'user' or TRIM_ANSWERS -%}
    {%- set text = text.strip() -%}
  {%- endif -%}
  {%- set ns.turns = ns.turns + [{'role': m.role, 'content': text}] -%}
{%- endfor -%}
"""


def _jinja_str(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Jinja string literal


def image_separator(tokenizer) -> str:
    """What the chat template writes after a turn's images so that LlavaProcessor, which
    tokenizes the prompt whole, gives tinylmm's ids. tinylmm tokenizes the text after an
    `<image>` on its own, as LLaVA's and TinyLLaVA's `tokenizer_image_token` do; a tokenizer
    that marks a word boundary at the start of a text (Metaspace, prepend_scheme "first")
    then starts it with "▁", which it does not write after a special token inside a text. A
    space there is that "▁"."""
    probe = "\nWhat is in the picture?"
    alone = tokenizer(probe, add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for separator in ("", " "):
        after = tokenizer(IMAGE_TOKEN + separator + probe, add_special_tokens=False)["input_ids"]
        if after[:1] == [image_id] and after[1:] == alone:
            return separator
    raise ExportError(
        f"the tokenizer ({type(tokenizer).__name__}) tokenizes the text after <image> differently from that "
        "text alone, and no prefix reproduces tinylmm's tokenization in a whole-prompt processor"
    )


def chat_template(processor) -> str:
    """A chat_template.jinja that renders the model's conversation format, as tinylmm's
    processor renders it, from transformers' multimodal messages."""
    template = processor.template
    prelude = _PRELUDE.replace("SEPARATOR", _jinja_str(image_separator(processor.tokenizer)))
    if isinstance(template, ChatTemplate):  # the tokenizer's own template, given tinylmm's turns
        own = processor.tokenizer.chat_template
        defaults = (
            "{%- if enable_thinking is not defined -%}{%- set enable_thinking = false -%}{%- endif -%}"
            "{%- if date_string is not defined -%}{%- set date_string = " + _jinja_str(FIXED_DATE) + " -%}{%- endif -%}"
        )
        return defaults + prelude.replace("TRIM_ANSWERS", "true") + "{%- set messages = ns.turns -%}" + own
    assert isinstance(template, Template)
    eos = template.end_token(processor.tokenizer)
    user_before, user_after = template.user.split("{content}")
    answer_before, answer_after = template.assistant.split("{content}")
    answer_after = answer_after.format(eos=eos)
    system = template.system + " " if template.system else ""
    body = (
        "{%- for m in ns.turns -%}"
        "{%- if m.role == 'system' -%}{{- raise_exception('this model has a fixed system prompt: no system "
        "messages') -}}"
        "{%- elif m.role == 'user' -%}{{- "
        + _jinja_str(user_before)
        + " + m.content + "
        + _jinja_str(user_after)
        + " -}}"
        "{%- elif m.role == 'assistant' -%}{{- "
        + _jinja_str(answer_before)
        + " + m.content + "
        + _jinja_str(answer_after)
        + " -}}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + _jinja_str(template.generation_prompt) + " -}}{%- endif -%}"
    )
    return prelude.replace("TRIM_ANSWERS", "false") + "{{- " + _jinja_str(system) + " -}}" + body


def save_processor(processor, model, out: Path) -> None:
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    settings = image_processor_config(processor.image_processor)
    image_processor = LlavaImageProcessorPil(**{k: v for k, v in settings.items() if k != "image_processor_type"})
    template = chat_template(processor)
    tokenizer = copy.deepcopy(processor.tokenizer)  # tinylmm's `auto` template stays bound to the original
    tokenizer.chat_template = template
    llava = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=model.vision.patch_size,
        vision_feature_select_strategy=select_strategy(model),
        chat_template=template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=int(model.vision.has_cls),
    )
    llava.save_pretrained(str(out))
    complete_saved(tokenizer, out)  # the flags transformers drops, and a reload check (data/tokenizer_files.py)
    # transformers 5 nests the image processor in processor_config.json; older readers (the
    # transformers vLLM pins, lmms-eval) look for the classic file
    image_processor.to_json_file(str(out / "preprocessor_config.json"))


def save_generation_config(processor, out: Path) -> None:
    from transformers import GenerationConfig

    tok = processor.tokenizer
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=processor.stop_token_ids,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    ).save_pretrained(str(out))


# --------------------------------------------------------------------------- Gemma


def _probe(model, processor) -> dict:
    image = Image.new("RGB", (processor.image_processor.size,) * 2, (128, 128, 128))
    batch = processor.prompt([("human", IMAGE_TOKEN + "\nWhat is in the picture?")], [image])
    return {k: v.to(model.device) for k, v in batch.items()}


@torch.no_grad()
def measured_differences(model, processor) -> list[str]:
    """What this model loses in LLaVA, measured on a probe (a grey image, one question): max
    |logit difference| from tinylmm's logits. Gemma-2: LlavaForConditionalGeneration applies
    its lm_head without the text model's final_logit_softcapping (transformers); vLLM
    soft-caps (its Gemma2 logits processor) but multiplies the visual tokens by the embedding
    scale. Soft-capping is monotonic: greedy answers are unchanged."""
    batch = _probe(model, processor)
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    ours = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits.float()
    out = []
    cap = getattr(model.llm.config, "final_logit_softcapping", None)
    if cap:
        hidden = model.llm.get_decoder()(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        raw = model.llm.get_output_embeddings()(hidden.last_hidden_state).float()
        out.append(
            f"transformers' LLaVA leaves out the LLM's final_logit_softcapping ({cap:g}): max |logit difference| "
            f"{(ours - raw).abs().max():.3g} (greedy answers unchanged: the cap is monotonic)"
        )
    scale = embed_scale(model)
    if scale != 1.0:
        is_image = (batch["input_ids"] == model.image_token_id).unsqueeze(-1)
        scaled = torch.where(is_image, embeds * scale, embeds)
        theirs = model.llm(inputs_embeds=scaled, attention_mask=batch["attention_mask"]).logits.float()
        out.append(
            f"vLLM multiplies the visual tokens by the embedding scale ({scale:.4g}), which transformers and tinylmm "
            f"apply to text tokens only: max |logit difference| {(ours - theirs).abs().max():.3g} under vLLM"
        )
    return out


# --------------------------------------------------------------------------- export


def export(model, processor, out) -> list[str]:
    """Write `model` (a TinyLMM without adapters) and `processor` as a transformers LLaVA
    directory at `out` (created). Returns notes and warnings for the user."""
    check(model, processor)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    image_token_id = processor.image_token_id
    weights, vocab, weight_notes = llava_weights(model, image_token_id)
    notes += weight_notes
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(llava_config(model, image_token_id, vocab), indent=2) + "\n")
    save_generation_config(processor, out)
    save_processor(processor, model, out)
    notes += [f"warning: {type(model.llm).__name__}: {d}" for d in measured_differences(model, processor)]
    notes.append(
        f"{model.num_image_tokens} visual tokens per image (vision_feature_select_strategy "
        f"'{select_strategy(model)}'), <image> id {image_token_id}, template '{processor.template_name}'"
    )
    return notes
