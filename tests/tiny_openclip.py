"""Tiny open_clip towers for tests, registered through open_clip's API for custom configs
(`open_clip.add_model_config`, tests/openclip_configs/); the timm ViTs two of them name are
registered with timm's `register_model`, as timm's SigLIP entrypoints build theirs.
Import after `conftest.require_openclip()`."""

from pathlib import Path

import open_clip
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer


def _timm_vit(**defaults):
    def entrypoint(pretrained=False, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
        vit = VisionTransformer(**{**defaults, **kwargs})
        vit.default_cfg = {}  # what timm's builder attaches (no pretrained weights here)
        return vit

    return entrypoint


SIGLIP = dict(class_token=False, global_pool="map")  # as timm's vit_*_siglip_* entrypoints
for _name, _kwargs in {
    "tinylmm_test_siglip": dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2, **SIGLIP),
    "tinylmm_test_reg": dict(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2, reg_tokens=2, global_pool="avg"
    ),
    "tinylmm_test_siglip_mid": dict(img_size=112, patch_size=16, embed_dim=384, depth=4, num_heads=6, **SIGLIP),
}.items():
    _fn = _timm_vit(**_kwargs)
    _fn.__name__ = _fn.__qualname__ = _name
    register_model(_fn)
open_clip.add_model_config(Path(__file__).parent / "openclip_configs")


# A shipped open_clip tower -> the tiny one of the same classes (timm's SigLIP ViT without a
# class token; open_clip's own CLIP ViT with QuickGELU and a class token).
TINY_FOR = {"ViT-SO400M-14-SigLIP-384": "tinylmm-test-siglip", "ViT-L-14-336-quickgelu": "tinylmm-test-clip"}
