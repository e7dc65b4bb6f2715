"""Vision towers: transformers' CLIP, SigLIP and DINOv2 models, cut at the feature layer
(open_clip's towers, `name_or_path: open_clip:<model>`, are in openclip.py): the
`transformers` vision backend.

LLaVA reads the penultimate layer (`feature_layer: -2`). Layers after the feature layer,
the post-layernorm (DINOv2: `layernorm`) and SigLIP's pooling head never influence that
output, so the tower drops them at build time: less compute and memory, and no parameters
that would receive no gradient (which DDP rejects). DINOv2's `mask_token` (its masked
pre-training only) goes for the same reason. A saved tower is therefore already cut, and
is saved with `feature_layer: -1`.

DINOv2 is published at 518 px (37 x 37 patches) and interpolates its position embeddings
to any input that is a multiple of its patch: `model.vision.image_size` sets the input
size (224: 16 x 16 patches, as LLaVA-style use and DINOv2's own 224 px evaluation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import torch
from torch import nn

from tinylmm.data.processor import ImageProcessor
from tinylmm.errors import ConfigError, unknown
from tinylmm.models.arch import arch_config, vision_part
from tinylmm.models.llm import NOT_CONFIG
from tinylmm.models.loading import from_pretrained_or_fail
from tinylmm.models.vision.base import VISION_BACKENDS
from tinylmm.schema import VisionSpec

log = logging.getLogger(__name__)

# Normalisation of the families, as in their preprocessor_config.json.
FAMILY_MEAN_STD = {
    "siglip_vision_model": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "clip_vision_model": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "dinov2": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),  # ImageNet's (facebook/dinov2-*)
}

# Towers that interpolate their position embeddings to another input size in every forward
# (DINOv2 always does); CLIP's and SigLIP's would need `interpolate_pos_encoding`.
RESIZABLE = ("dinov2",)


VISION_TYPES = ("siglip_vision_model", "clip_vision_model", "dinov2")


@functools.cache
def classes() -> dict:
    """model_type -> (config class, model class). transformers' model code is imported on
    first use: validating a config asks this backend and must stay fast for the CLI."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    return {
        "siglip_vision_model": (SiglipVisionConfig, SiglipVisionModel),
        "clip_vision_model": (CLIPVisionConfig, CLIPVisionModel),
        "dinov2": (Dinov2Config, Dinov2Model),
    }


def config_from_dict(config: dict, attn_implementation: str = "sdpa"):
    model_type = config.get("model_type")
    if model_type not in VISION_TYPES:
        raise unknown("vision model_type", str(model_type), VISION_TYPES)
    cfg = classes()[model_type][0](**{k: v for k, v in config.items() if k != "model_type" and k not in NOT_CONFIG})
    cfg._attn_implementation = attn_implementation
    return cfg


class VisionTower(nn.Module):
    def __init__(self, model: nn.Module, spec: VisionSpec):
        super().__init__()
        inner = getattr(model, "vision_model", model)  # older transformers nest the transformer
        # CLIP / SigLIP: encoder.layers, post_layernorm; DINOv2: encoder.layer, layernorm
        self._layers_name = "layers" if hasattr(inner.encoder, "layers") else "layer"
        layers = getattr(inner.encoder, self._layers_name)
        total = len(layers)
        keep = spec.feature_layer + total + 1 if spec.feature_layer < 0 else spec.feature_layer
        if not 1 <= keep <= total:
            raise ConfigError(f"model.vision.feature_layer={spec.feature_layer} is outside the tower's {total} layers")
        setattr(inner.encoder, self._layers_name, layers[:keep])
        # Never used for the features: see the module docstring.
        for norm in ("post_layernorm", "layernorm"):
            if hasattr(inner, norm):
                setattr(inner, norm, nn.Identity())
        if hasattr(inner, "head"):
            inner.head = nn.Identity()
            inner.use_head = False
        if getattr(inner.embeddings, "mask_token", None) is not None:
            inner.embeddings.mask_token = None
            model.config.use_mask_token = False
        model.config.num_hidden_layers = keep
        if hasattr(model.config, "stage_names"):  # DINOv2's config is a backbone's too: its stages follow the cut
            model.config.stage_names = ["stem"] + [f"stage{i}" for i in range(1, keep + 1)]
            model.config.set_output_features_output_indices(out_features=None, out_indices=None)
        if hasattr(model.config, "vision_use_head"):
            model.config.vision_use_head = False
        self.model = model
        self._inner = [inner]  # not a submodule twice
        self.has_cls = hasattr(inner.embeddings, "class_embedding") or hasattr(inner.embeddings, "cls_token")
        # Token 0 goes for `patch` when it is a CLS token, and always for `drop_first`.
        self.drop_first = spec.select == "drop_first" or (self.has_cls and spec.select == "patch")
        self.spec = dataclasses.replace(spec, feature_layer=-1)
        self.hidden_size = model.config.hidden_size
        patch = model.config.patch_size
        self.image_size = spec.image_size or model.config.image_size
        if spec.image_size is not None:
            if model.config.model_type not in RESIZABLE:
                raise ConfigError(
                    f"model.vision.image_size: a {model.config.model_type} tower takes its own "
                    f"{model.config.image_size} px; only {', '.join(RESIZABLE)} towers take another size"
                )
            if spec.image_size % patch:
                raise ConfigError(
                    f"model.vision.image_size={spec.image_size} is not a multiple of the tower's "
                    f"patch size {patch} (e.g. {spec.image_size // patch * patch or patch})"
                )
        grid = self.image_size // patch
        self.patch_size = patch
        self.tower_tokens = grid * grid + int(self.has_cls)  # tokens inside the tower per image
        self.num_patches = self.tower_tokens - int(self.drop_first)

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self._inner[0].encoder, self._layers_name)

    @property
    def patch_embedding(self) -> nn.Conv2d:
        """The patch embedding's convolution (its weight's dtype is the tower's input dtype)."""
        emb = self._inner[0].embeddings
        return emb.patch_embedding if hasattr(emb, "patch_embedding") else emb.patch_embeddings.projection

    @property
    def config(self):
        return self.model.config

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        inner = self._inner[0]
        h = inner.embeddings(pixel_values.to(self.patch_embedding.weight.dtype))
        if hasattr(inner, "pre_layrnorm"):  # CLIP
            h = inner.pre_layrnorm(h)
        if self._layers_name == "layer":  # DINOv2's encoder takes the hidden states positionally
            h = inner.encoder(h).last_hidden_state
        else:
            h = inner.encoder(inputs_embeds=h).last_hidden_state
        return h[:, 1:] if self.drop_first else h

    def trace(self, ctx):
        """The planner's replay of `forward` (tinylmm/memory/activations.py: TowerTrace), up to
        the CLS drop: the patch convolution, the embeddings added to it, CLIP's pre_layrnorm,
        the encoder's layers."""
        inner, vcfg = self._inner[0], self.config
        conv_out, conv_train = trace_patch_embedding(ctx, self.patch_embedding, self.patch_size)
        emb = inner.embeddings
        # CLIP / SigLIP: an nn.Embedding of positions; DINOv2: position embeddings (interpolated
        # to the input size: a fixed-size computation that saves nothing per token) and a CLS
        # token concatenated to the patches, both as parameters: type promotion takes the widest
        added = (
            [emb.position_embedding.weight]
            if hasattr(emb, "position_embedding")
            else [emb.position_embeddings, emb.cls_token]
        )
        x = ctx.tensor(
            vcfg.hidden_size,
            max([conv_out] + [ctx.wbytes(p) for p in added]),
            conv_train or any(ctx.trains(p) for p in added),
        )
        if hasattr(inner, "pre_layrnorm"):  # CLIP
            x = ctx.top.layernorm(x, ctx.norm(inner.pre_layrnorm.weight))
        heads = vcfg.num_attention_heads
        if vcfg.model_type == "dinov2":
            return ctx.blocks(x, lambda tr, x, view: dinov2_layer(tr, x, view, heads, ctx.eager))
        act_saves = 2 if getattr(vcfg, "hidden_act", "") == "quick_gelu" else 1
        return ctx.blocks(x, lambda tr, x, view: vit_layer(tr, x, view, heads, act_saves, ctx.eager))


# --------------------------------------------------------------------------- the planner's replay
# The blocks op by op as their forward code runs them, on the memory planner's tracer `tr`
# (tinylmm/memory/tracer.py) with `L` a block's LayerView (tinylmm/memory/layers.py), both
# passed in: this module does not import the planner.


def trace_patch_embedding(ctx, conv: nn.Conv2d, patch: int) -> tuple[float, bool]:
    """The patch convolution every tower opens with (OpenCLIPTower's too), on `ctx.top`: the
    pixels are cast to the conv's dtype; a trainable conv saves them (in the half dtype under
    autocast, with a half copy of its weight). (bytes per element of its output, whether it
    trains)."""
    top, w = ctx.top, conv.weight
    trains = ctx.trains(w)
    px = top.cast(ctx.tensor(3 * patch**2, 4, False), ctx.wbytes(w))  # pixels cast to the conv dtype
    if trains:
        top.save(top.cast(px, top.c) if ctx.autocast else px)
        if ctx.autocast:
            top.fixed += top.c * w.numel()
    return (top.c if ctx.autocast else ctx.wbytes(w)), trains


def vit_layer(tr, x, L, heads: int, act_saves: int, eager: bool):
    """CLIPEncoderLayer / SiglipEncoderLayer. `act_saves`: tensors of its input's size the
    MLP's activation saves (2 for quick_gelu, x * sigmoid(1.702 x))."""
    h = tr.layernorm(x, L.norm("layer_norm1"))
    q, k, v = (tr.linear(h, L.lin(f"self_attn.{n}")) for n in ("q_proj", "k_proj", "v_proj"))
    a = tr.sdpa(q, k, v, heads, repeat_kv=False, mask=False, eager=eager)
    x = tr.add(x, tr.linear(a, L.lin("self_attn.out_proj")))
    h = tr.layernorm(x, L.norm("layer_norm2"))
    m = tr.unary(tr.linear(h, L.lin("mlp.fc1")), saves=act_saves)
    return tr.add(x, tr.linear(m, L.lin("mlp.fc2")))


def dinov2_layer(tr, x, L, heads: int, eager: bool):
    """Dinov2Layer: each branch's output multiplied by a per-channel LayerScale before the
    residual add. Stochastic depth (drop_path) and the SwiGLU MLP (ViT-g) are not modelled."""
    if not isinstance(L.get("drop_path"), nn.Identity) or hasattr(L.get("mlp"), "gate_proj"):
        raise ConfigError(
            f"the memory planner does not know the layer layout of {type(L.block).__name__} "
            f"({L.prefix}): it knows DINOv2 layers with a GELU MLP and no drop path "
            "(drop_path_rate: 0, use_swiglu_ffn: false)"
        )
    h = tr.layernorm(x, L.norm("norm1"))
    q, k, v = (tr.linear(h, L.lin(f"attention.{n}")) for n in ("q_proj", "k_proj", "v_proj"))
    a = tr.sdpa(q, k, v, heads, repeat_kv=False, mask=False, eager=eager)
    x = tr.add(x, tr.scale(tr.linear(a, L.lin("attention.o_proj")), L.scale("layer_scale1")))
    h = tr.layernorm(x, L.norm("norm2"))
    m = tr.unary(tr.linear(h, L.lin("mlp.fc1")))
    return tr.add(x, tr.scale(tr.linear(m, L.lin("mlp.fc2")), L.scale("layer_scale2")))


def image_mean_std(spec: VisionSpec, model_type: str):
    mean, std = FAMILY_MEAN_STD.get(model_type, ([0.5] * 3, [0.5] * 3))
    return spec.image_mean or mean, spec.image_std or std


def _model(cfg, device=None, dtype=None) -> nn.Module:
    with contextlib.nullcontext() if device is None else torch.device(device):  # None: the caller's device
        model = classes()[cfg.model_type][1](cfg)
    return model if dtype is None else model.to(dtype)


@VISION_BACKENDS.register("transformers")
class TransformersBackend:
    """transformers' CLIP, SigLIP and DINOv2 towers: a hub id, a local directory or an
    inline `config`."""

    @staticmethod
    def validate(spec: VisionSpec) -> None:
        if spec.pretrained is not None:
            raise ConfigError(
                "model.vision.pretrained names the weights of an open_clip tower (name_or_path: "
                "open_clip:<model>); a hub id or directory brings its own weights"
            )

    @staticmethod
    def build(spec: VisionSpec, *, device=None, dtype=None, attn_implementation: str = "sdpa") -> VisionTower:
        if torch.device(device or "cpu").type == "meta":  # shapes only, from the architecture config
            return VisionTower(_model(config_from_dict(arch_config(spec, "vision")), "meta"), spec)
        if spec.config is not None:
            model = _model(config_from_dict(spec.config, attn_implementation), device, dtype)
        elif spec.name_or_path:
            from transformers import AutoConfig

            cfg = from_pretrained_or_fail(AutoConfig, spec.name_or_path, "vision tower")
            cfg = getattr(cfg, "vision_config", cfg)  # a full CLIP/SigLIP checkpoint holds both towers
            if cfg.model_type not in VISION_TYPES:
                raise unknown("vision model_type", cfg.model_type, VISION_TYPES)
            model = from_pretrained_or_fail(
                classes()[cfg.model_type][1],
                spec.name_or_path,
                "vision tower",
                dtype=dtype,
                attn_implementation=attn_implementation,
            )
        else:
            raise ConfigError("model.vision needs 'name_or_path' (hub id or directory) or an inline 'config'")
        return VisionTower(model, spec)

    @staticmethod
    def load(directory, spec: VisionSpec, attn_implementation: str = "sdpa") -> VisionTower:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(directory))
        cfg._attn_implementation = attn_implementation
        return VisionTower(_model(cfg), spec)

    @staticmethod
    def image_processor(spec: VisionSpec, tower: VisionTower) -> ImageProcessor:
        mean, std = image_mean_std(spec, tower.config.model_type)
        return ImageProcessor(size=tower.image_size, image_mean=mean, image_std=std, pad_to_square=spec.pad_to_square)

    @staticmethod
    def uncut_parameters(spec: VisionSpec) -> int:
        model = _model(config_from_dict(vision_part(arch_config(spec, "vision"))), "meta")
        return sum(p.numel() for p in model.parameters())

    @staticmethod
    def requirement(spec: VisionSpec):
        return None

    @staticmethod
    def model_type(tower: VisionTower) -> str:
        return tower.config.model_type
