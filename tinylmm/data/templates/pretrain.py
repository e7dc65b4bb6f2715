"""Caption alignment (LLaVA's and TinyLLaVA's `plain` / "pretrain" format): `<image>` then
the caption and a newline; only the caption and the newline are supervised."""

from tinylmm.data.templates.core import TEMPLATES, Template

TEMPLATES.register(
    "pretrain",
    Template(
        "pretrain",
        system="",
        user="{content}",
        assistant="{content}{eos}",
        eos="\n",
        generation_prompt="",
        caption_only=True,
        description="caption alignment: <image> then the caption and a newline (stage template)",
    ),
)
