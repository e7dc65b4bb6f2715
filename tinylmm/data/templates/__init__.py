"""Conversation templates and label masking (the rules: core.py's docstring).

The registry `TEMPLATES` holds one entry per format; each file of this package adds its
own. `auto` (core.ChatTemplate) is the tokenizer's own chat template.
"""

from tinylmm.data.templates import pretrain, tinyllava  # noqa: F401 - register their templates
from tinylmm.data.templates.core import (
    AUTO,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    TEMPLATES,
    TINYLLAVA_SYSTEM,
    ChatTemplate,
    Template,
    TemplateError,
    TemplateMismatch,
    bind_template,
    describe_templates,
    get_template,
    human_text,
    template_names,
    tokenize_pieces,
    tokenize_with_labels,
    tokenizer_name,
)

__all__ = [
    "AUTO",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "TEMPLATES",
    "TINYLLAVA_SYSTEM",
    "ChatTemplate",
    "Template",
    "TemplateError",
    "TemplateMismatch",
    "bind_template",
    "describe_templates",
    "get_template",
    "human_text",
    "template_names",
    "tokenize_pieces",
    "tokenize_with_labels",
    "tokenizer_name",
]
