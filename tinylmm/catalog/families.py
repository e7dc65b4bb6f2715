"""The LLM and vision families a preset belongs to (model_zoo.yaml's `family` and
`vision_family`), for `tinylmm zoo ls --family/--vision`. One entry each: adding a family
is one `register` line here and a preset that names it."""

from __future__ import annotations

from tinylmm.registry import Registry

LLM_FAMILIES: Registry[str] = Registry("LLM family")
VISION_FAMILIES: Registry[str] = Registry("vision family")

for name, text in (
    ("phi2", "Microsoft Phi-2 (2.7B)"),
    ("stablelm2", "Stability StableLM-2 (1.6B)"),
    ("tinyllama", "TinyLlama-1.1B"),
    ("qwen2.5", "Qwen2.5 instruct (0.5-3B)"),
    ("qwen3", "Qwen3 (0.6-4B)"),
    ("smollm2", "Hugging Face SmolLM2 (1.7B)"),
    ("llama3.2", "Meta Llama-3.2 instruct (1-3B), gated"),
    ("gemma2", "Google Gemma-2 (2B), gated"),
    ("toy", "the built-in toy LLM"),
    ("other", "anything else (a user's preset)"),
):
    LLM_FAMILIES.register(name, text)

for name, text in (
    ("siglip", "SigLIP (transformers)"),
    ("siglip2", "SigLIP2 (transformers' siglip checkpoints)"),
    ("clip", "OpenAI CLIP (transformers)"),
    ("dinov2", "Meta DINOv2 (transformers)"),
    ("open_clip", "any ViT of open_clip"),
    ("toy", "the built-in toy tower"),
    ("other", "anything else (a user's preset)"),
):
    VISION_FAMILIES.register(name, text)
