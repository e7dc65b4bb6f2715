"""Vision towers from open_clip (the `openclip` extra): `name_or_path: open_clip:<model>`.

    vision:
      name_or_path: open_clip:ViT-SO400M-14-SigLIP-384   # any name in open_clip.list_models()
      pretrained: webli          # open_clip's tag (from the Hugging Face cache / hub), or
                                 # a directory holding a download of the tag's hub repo, or
                                 # a checkpoint file; absent: random initialisation

Only the image tower is built, never the text tower. The contract is VisionTower's
(hf.py): the features are the output of block `feature_layer` (-2: the
second-to-last, as hidden_states[-2] of a transformers tower), read through open_clip's
`forward_intermediates`; the blocks after it, the final norm and the pooling/projection
head are pruned at build time, so every parameter left feeds the features. `select:
patch` drops the prefix tokens (CLS and registers, where the tower has them);
`cls_patch` keeps them, first.

Preprocessing follows open_clip's: its defaults, overlaid by the tag's settings (a tag)
or the `preprocess_cfg` of the directory's open_clip_config.json (a directory); a bare
checkpoint file gets the defaults, as `open_clip.create_model(name, pretrained=FILE)`.

A checkpoint records the tower in vision/open_clip.json (the image tower's open_clip
config, the depth it keeps, the preprocessing); its weights are in model.safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tinylmm.data.processor import ImageProcessor
from tinylmm.errors import ConfigError, did_you_mean
from tinylmm.models.loading import ModelNotFoundError
from tinylmm.models.vision.base import VISION_BACKENDS
from tinylmm.models.vision.hf import trace_patch_embedding
from tinylmm.schema import VisionSpec

log = logging.getLogger(__name__)

PREFIX = "open_clip:"
CONFIG_FILE = "open_clip.json"  # in a checkpoint's vision/ directory
# What `huggingface-cli download <the tag's repo>` holds, in open_clip's order of preference.
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
PREPROCESS_KEYS = ("size", "mean", "std", "interpolation", "resize_mode", "fill_color")


class OpenCLIPMissing(ConfigError):
    """open_clip_torch (an optional dependency) is not installed."""


def _open_clip(what: str):
    try:
        import open_clip
    except ImportError as e:
        raise OpenCLIPMissing(
            f"the vision tower '{what}' needs open_clip_torch and torchvision: pip install 'tinylmm[openclip]' ({e})"
        ) from None
    return open_clip


def model_config(name: str) -> dict:
    """open_clip's model config of `name` (a copy), checked: the image tower must be a ViT."""
    oc = _open_clip(PREFIX + name)
    if not name or name.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(
            f"model.vision.name_or_path: '{PREFIX}{name}' needs one of open_clip's model names "
            "(open_clip.list_models()); put a directory or file of weights in model.vision.pretrained"
        )
    cfg = oc.get_model_config(name) if name in oc.list_models() else None
    if cfg is None:
        known = oc.list_models()
        raise ConfigError(
            f"unknown open_clip model '{name}' in model.vision.name_or_path{did_you_mean(name, known)}; "
            f"open_clip {oc.__version__} knows {len(known)} models, listed by "
            "`python -c 'import open_clip; print(open_clip.list_models())'`"
        )
    if isinstance(cfg["vision_cfg"].get("layers"), (list, tuple)):  # open_clip's ModifiedResNet
        raise _not_a_vit(name)
    return cfg


def _not_a_vit(name: str) -> ConfigError:
    return ConfigError(
        f"open_clip model '{name}': its image tower is not a ViT (tinylmm reads the tokens of a "
        "ViT's blocks); pick a ViT model"
    )


# --------------------------------------------------------------------------- the record


@dataclass
class OpenCLIPConfig:
    """What rebuilds the tower: open_clip's image-tower config, the blocks it keeps, and
    how its images are preprocessed. Saved as vision/open_clip.json."""

    model_name: str
    embed_dim: int
    vision_cfg: dict
    quick_gelu: bool
    layers: int  # blocks kept (the feature layer's depth)
    preprocess: dict  # open_clip's PreprocessCfg fields (PREPROCESS_KEYS); size: the tower's
    pretrained: str | None = None  # where the weights first came from (for the record)

    @classmethod
    def of(cls, name: str, cfg: dict, preprocess: dict, pretrained: str | None = None) -> OpenCLIPConfig:
        """From open_clip's model config `cfg` of `name` (layers: set when the tower is cut)."""
        return cls(
            name, cfg["embed_dim"], cfg["vision_cfg"], bool(cfg.get("quick_gelu", False)), 0, preprocess, pretrained
        )

    def save_pretrained(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> OpenCLIPConfig:
        path = Path(directory) / CONFIG_FILE
        data = json.loads(path.read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise ValueError(f"{path}: expected the keys {sorted(names)}, found {sorted(data)}")
        return cls(**data)

    def image_processor(self, spec: VisionSpec) -> ImageProcessor:
        p = self.preprocess
        fill = p["fill_color"]
        return ImageProcessor(
            size=p["size"],
            image_mean=list(spec.image_mean or p["mean"]),
            image_std=list(spec.image_std or p["std"]),
            pad_to_square=spec.pad_to_square,
            resize=p["resize_mode"],
            # open_clip's 'random' interpolation is a training augmentation; at inference it is bicubic
            interpolation="bilinear" if p["interpolation"] == "bilinear" else "bicubic",
            fill=list(fill) if isinstance(fill, (list, tuple)) else [int(fill)] * 3,
        )


def _preprocess(overlay: dict) -> dict:
    """open_clip's defaults overlaid by `overlay`; the size is the tower's (OpenCLIPTower sets it)."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = merge_preprocess_dict(PreprocessCfg(), overlay or {})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in PREPROCESS_KEYS}


# --------------------------------------------------------------------------- the tower


class OpenCLIPTower(nn.Module):
    """An open_clip image tower cut at the feature layer, with VisionTower's interface."""

    def __init__(self, visual: nn.Module, spec: VisionSpec, config: OpenCLIPConfig):
        super().__init__()
        timm = hasattr(visual, "trunk")  # open_clip's TimmModel wraps a timm model
        vit = visual.trunk if timm else visual
        if timm and not all(
            hasattr(vit, a) for a in ("blocks", "num_prefix_tokens", "patch_embed", "prune_intermediate_layers")
        ):
            raise _not_a_vit(config.model_name)
        total = len(vit.blocks if timm else vit.transformer.resblocks)
        keep = spec.feature_layer + total + 1 if spec.feature_layer < 0 else spec.feature_layer
        if not 1 <= keep <= total:
            raise ConfigError(f"model.vision.feature_layer={spec.feature_layer} is outside the tower's {total} layers")
        # Blocks after the feature layer, the final norm and the pooling/projection head never
        # reach the features: pruned, so no parameter goes without a gradient (DDP) or memory.
        if timm:
            vit.prune_intermediate_layers([keep - 1], prune_norm=True, prune_head=True)
            visual.head = nn.Identity()
            self.num_prefix_tokens = vit.num_prefix_tokens
            grid = vit.patch_embed.grid_size
        else:
            visual.prune_intermediate_layers([keep - 1], prune_norm=True, prune_head=True)
            visual.attn_pool = visual.attn_pool_contrastive = None
            self.num_prefix_tokens = 1  # open_clip's VisionTransformer always has its class token
            grid = visual.grid_size
        self.model = visual
        self._vit = [vit]  # not a submodule twice
        self.timm = timm
        self.has_cls = self.num_prefix_tokens > 0
        self.drop_first = self.has_cls and spec.select == "patch"
        self.spec = dataclasses.replace(spec, feature_layer=-1)
        self.hidden_size = vit.embed_dim if timm else vit.transformer.width
        self.patch_size = (vit.patch_embed.patch_size if timm else vit.patch_size)[0]
        size = vit.patch_embed.img_size if timm else vit.image_size  # may exceed grid x patch (384 = 27 x 14 + 6)
        if size[0] != size[1]:
            raise ConfigError(
                f"open_clip model '{config.model_name}' takes {size[0]}x{size[1]} images; tinylmm takes square ones"
            )
        self.image_size = size[0]
        self.config = dataclasses.replace(config, layers=keep, preprocess={**config.preprocess, "size": size[0]})
        self.tower_tokens = grid[0] * grid[1] + self.num_prefix_tokens  # tokens inside the tower per image
        self.num_patches = grid[0] * grid[1] + (0 if self.drop_first else self.num_prefix_tokens)

    @property
    def layers(self) -> nn.Module:
        """The blocks (timm: an nn.Sequential; open_clip: an nn.ModuleList)."""
        return self._vit[0].blocks if self.timm else self._vit[0].transformer.resblocks

    @property
    def patch_embedding(self) -> nn.Conv2d:
        return self._vit[0].patch_embed.proj if self.timm else self._vit[0].conv1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        keep_prefix = self.has_cls and not self.drop_first
        out = self.model.forward_intermediates(
            pixel_values.to(self.patch_embedding.weight.dtype),
            indices=1,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=keep_prefix,
        )
        patches = out["image_intermediates"][0]  # prefix tokens split off (views)
        return torch.cat([out["image_intermediates_prefix"][0], patches], 1) if keep_prefix else patches

    def trace(self, ctx):
        """The planner's replay of `forward` (tinylmm/memory/activations.py: TowerTrace), up to
        the prefix drop: the patch convolution, the position embedding and prefix tokens, the
        norm before the blocks, the blocks."""
        conv_out, conv_train = trace_patch_embedding(ctx, self.patch_embedding, self.patch_size)
        emb, pre_norm = openclip_embeddings(self)
        # timm adds its position embedding as is (type promotion); open_clip casts it to x's dtype
        x = ctx.tensor(
            self.hidden_size,
            max([conv_out] + [ctx.wbytes(p) for p in emb]) if self.timm else conv_out,
            conv_train or any(ctx.trains(p) for p in emb),
        )
        if pre_norm is not None:
            x = ctx.top.layernorm(x, ctx.norm(pre_norm.weight))
        return ctx.blocks(x, openclip_block)


# --------------------------------------------------------------------------- the planner's replay
# On the memory planner's tracer `tr` with `L` a block's LayerView, passed in (see hf.py).

# The plain blocks, by their module names: timm's Block (SigLIP towers) and open_clip's own
# ResidualAttentionBlock (CLIP towers). Anything else in them (layer scale, q/k norms, drop
# path, dropout) is not modelled: the planner refuses such a block rather than guess.
_TIMM = dict(
    norm1="norm1",
    qkv="attn.qkv",
    out="attn.proj",
    norm2="norm2",
    fc1="mlp.fc1",
    act="mlp.act",
    fc2="mlp.fc2",
    plain=("ls1", "ls2", "drop_path1", "drop_path2", "attn.q_norm", "attn.k_norm", "attn.norm", "mlp.norm"),
)
_OPENCLIP = dict(
    norm1="ln_1",
    qkv="attn",
    out="attn.out_proj",
    norm2="ln_2",
    fc1="mlp.c_fc",
    act="mlp.gelu",
    fc2="mlp.c_proj",
    plain=("ls_1", "ls_2"),
)
_NO_DROP = ("attn.proj_drop", "mlp.drop1", "mlp.drop2")


def openclip_embeddings(tower: OpenCLIPTower) -> tuple[list, nn.Module | None]:
    """(the parameters added to the patch embeddings: position and prefix tokens, the
    norm before the blocks or None) of an OpenCLIPTower."""
    vit = tower._vit[0]
    if tower.timm:
        params = [p for p in (vit.pos_embed, vit.cls_token, getattr(vit, "reg_token", None)) if p is not None]
        pre = vit.norm_pre
    else:
        params, pre = [vit.positional_embedding, vit.class_embedding], vit.ln_pre
    return params, (None if isinstance(pre, nn.Identity) else pre)


def openclip_block(tr, x, L):
    timm = type(L.block).__name__ == "Block"
    names = _TIMM if timm else _OPENCLIP
    if (
        type(L.block).__name__ not in ("Block", "ResidualAttentionBlock")
        or not all(isinstance(L.get(n), nn.Identity) for n in names["plain"])
        or (timm and any(L.get(n).p for n in _NO_DROP))
    ):
        raise ConfigError(
            f"the memory planner does not know the layer layout of {type(L.block).__name__} "
            f"({L.prefix}): it knows open_clip's and timm's plain ViT blocks (no layer scale, "
            "q/k norm, drop path or dropout)"
        )
    attn = L.get("attn")
    heads = attn.num_heads
    h = tr.layernorm(x, L.norm(names["norm1"]))
    qkv = tr.linear(h, L.lin(names["qkv"]) if timm else L.packed(names["qkv"]))
    q, k, v = qkv.split(3)  # views of one tensor: 3 x 1/3 of it
    a = tr.sdpa(q, k, v, heads, repeat_kv=False, mask=False, eager=False)
    # out_proj / proj read sdpa's output through views: the CPU kernel lays its output out as
    # q is laid out, which is already the order the projection reads
    x = tr.add(x, tr.linear(a, L.lin(names["out"])))
    h = tr.layernorm(x, L.norm(names["norm2"]))
    act_saves = 2 if type(L.get(names["act"])).__name__ == "QuickGELU" else 1  # x * sigmoid(1.702 x)
    m = tr.unary(tr.linear(h, L.lin(names["fc1"])), saves=act_saves)
    return tr.add(x, tr.linear(m, L.lin(names["fc2"])))


# --------------------------------------------------------------------------- weights


def _weights(name: str, cfg: dict, pretrained: str | None, *, fetch: bool = True) -> tuple[Path | None, dict]:
    """(checkpoint file, preprocessing overlay) for `pretrained`: a tag, a directory, a file.
    `fetch=False` (planning on the meta device): the overlay only, no download, no file needed."""
    oc = _open_clip(PREFIX + name)
    if pretrained is None:
        return None, {}
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path, {}
    if path.is_dir():
        found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not found and fetch:
            raise ModelNotFoundError(
                f"model.vision.pretrained: the directory '{path}' holds none of "
                f"{', '.join(WEIGHT_FILES)} (a download of an open_clip hub repo has them)"
            )
        overlay = {}
        config_file = path / "open_clip_config.json"
        if config_file.is_file():
            data = json.loads(config_file.read_text())
            theirs = data.get("model_cfg", {}).get("vision_cfg")
            if theirs is not None and theirs != cfg["vision_cfg"]:
                raise ConfigError(
                    f"model.vision.pretrained: {config_file} describes another image tower than "
                    f"open_clip's '{name}' ({theirs} vs {cfg['vision_cfg']})"
                )
            overlay = data.get("preprocess_cfg", {})
        return (found[0] if found else None), overlay
    tags = oc.list_pretrained_tags_by_model(name)
    tag = oc.get_pretrained_cfg(name, pretrained)
    if not tag:
        looks_like_path = "/" in pretrained or pretrained.startswith((".", "~"))
        raise ConfigError(
            f"model.vision.pretrained: '{pretrained}' is "
            + (
                f"no file or directory (looked for '{path}')"
                if looks_like_path
                else f"not a pretrained tag of open_clip's '{name}'{did_you_mean(pretrained, tags)}"
            )
            + f"; its tags: {', '.join(tags) or 'none'}; or give a checkpoint file or directory"
        )
    if tag.get("quick_gelu", False) != cfg.get("quick_gelu", False):
        other = f"{name}-quickgelu" if tag.get("quick_gelu") else name.removesuffix("-quickgelu")
        raise ConfigError(
            f"model.vision: open_clip's '{pretrained}' weights were trained with"
            f"{'' if tag.get('quick_gelu') else 'out'} QuickGELU, and '{name}' is built "
            f"with{'out' if tag.get('quick_gelu') else ''} it: use name_or_path: {PREFIX}{other}"
        )
    if not fetch:
        return None, tag
    try:
        file = oc.download_pretrained(tag)
    except Exception as err:  # noqa: BLE001 - huggingface_hub / urllib raise many kinds; one message for all
        repo = tag.get("hf_hub", "").rstrip("/")
        fix = (
            f"huggingface-cli download {repo.split('/')[0]}/{repo.split('/')[1]} --local-dir DIR, then "
            "model.vision.pretrained=DIR"
            if repo
            else f"download {tag.get('url')} to FILE, then model.vision.pretrained=FILE"
        )
        raise ModelNotFoundError(
            f"could not load open_clip's '{name}' weights '{pretrained}' (from the Hugging Face "
            f"cache or hub: {repo or tag.get('url')}).\n  Fix: {fix}.\n  "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    return Path(file), tag


def _load_visual_state(visual: nn.Module, file: Path) -> None:
    """A full open_clip checkpoint's `visual.*` weights, or an image-tower-only state dict."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickle/zip errors of every kind: name the file
            raise ConfigError(f"model.vision.pretrained: cannot read '{file}' as a state dict ({err})") from None
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    try:
        visual.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(
            f"model.vision.pretrained: '{file}' does not fit the image tower: {str(err).splitlines()[0]} ..."
        ) from None


# --------------------------------------------------------------------------- building


def _visual(config: OpenCLIPConfig, device=None) -> nn.Module:
    from open_clip.model import _build_vision_tower  # the image tower alone (CLIP builds both)

    with contextlib.nullcontext() if device is None else torch.device(device):  # None: the caller's device
        return _build_vision_tower(config.embed_dim, dict(config.vision_cfg), config.quick_gelu)


def build_openclip(spec: VisionSpec, *, dtype=None, device=None) -> OpenCLIPTower:
    """The tower of `spec` (name_or_path `open_clip:<model>`). On the meta device (the
    planner) no weights are read."""
    name = spec.model_name
    cfg = model_config(name)
    meta = torch.device(device or "cpu").type == "meta"
    # On the meta device the weights' preprocessing still counts (what `zoo show` reports)
    file, overlay = _weights(name, cfg, spec.pretrained, fetch=not meta)
    config = OpenCLIPConfig.of(name, cfg, _preprocess(overlay), spec.pretrained)
    visual = _visual(config, device)
    if file is not None and not meta:
        _load_visual_state(visual, file)
    elif not meta:
        log.warning(
            "vision tower %s%s: no pretrained weights (model.vision.pretrained), randomly initialised", PREFIX, name
        )
    tower = OpenCLIPTower(visual, spec, config)
    if dtype is not None:
        tower.to(dtype)
    return tower


def load_tower(directory: Path, spec: VisionSpec) -> OpenCLIPTower:
    """The tower recorded in `directory`/open_clip.json, at random: the caller loads its
    weights (model.safetensors). Needs no open_clip registry entry for the name."""
    config = OpenCLIPConfig.load(directory)
    _open_clip(PREFIX + config.model_name)
    return OpenCLIPTower(_visual(config), dataclasses.replace(spec, feature_layer=config.layers), config)


def visual_parameter_count(name: str) -> int:
    """Parameters of open_clip's whole image tower `name` (uncut), counted on the meta device."""
    config = OpenCLIPConfig.of(name, model_config(name), {})
    return sum(p.numel() for p in _visual(config, "meta").parameters())


@VISION_BACKENDS.register("open_clip")
class OpenCLIPBackend:
    """open_clip's ViT image towers: `name_or_path: open_clip:<model>`, weights from `pretrained`."""

    @staticmethod
    def validate(spec: VisionSpec) -> None:
        if spec.config is not None:
            raise ConfigError(
                "model.vision: an open_clip tower takes its architecture from open_clip's model "
                "configs; give 'name_or_path: open_clip:<model>' or an inline 'config', not both"
            )
        if spec.select == "drop_first":
            raise ConfigError(
                "model.vision.select: drop_first is TinyLLaVA_Factory's rule for transformers' "
                "towers; an open_clip tower takes patch (prefix tokens dropped) or cls_patch"
            )
        if spec.image_size is not None:
            raise ConfigError(
                "model.vision.image_size: an open_clip tower takes the input size of its model "
                "config (choose an open_clip model of that size)"
            )

    @staticmethod
    def build(spec: VisionSpec, *, device=None, dtype=None, attn_implementation: str = "sdpa") -> OpenCLIPTower:
        # open_clip's attention is its own (sdpa): attn_implementation is transformers'
        OpenCLIPBackend.validate(spec)
        return build_openclip(spec, dtype=dtype, device=device)

    @staticmethod
    def load(directory: Path, spec: VisionSpec, attn_implementation: str = "sdpa") -> OpenCLIPTower:
        return load_tower(directory, spec)

    @staticmethod
    def image_processor(spec: VisionSpec, tower: OpenCLIPTower) -> ImageProcessor:
        return tower.config.image_processor(spec)

    @staticmethod
    def uncut_parameters(spec: VisionSpec) -> int:
        return visual_parameter_count(spec.model_name)

    @staticmethod
    def requirement(spec: VisionSpec):
        return "open_clip", (
            f"the vision tower '{spec.name_or_path}' needs open_clip_torch and torchvision: "
            "pip install 'tinylmm[openclip]'"
        )

    @staticmethod
    def model_type(tower: OpenCLIPTower) -> str:
        return f"open_clip:{tower.config.model_name}"
