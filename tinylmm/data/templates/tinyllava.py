"""TinyLLaVA's USER/ASSISTANT conversation formats (TinyLLaVA_Factory's `phi`, `llama`, and
the versions that end answers with the tokenizer's own eos): the system line, then
`USER: <image>\\n{question} ASSISTANT: {answer}{eos}` per turn, the prompt ending at
"ASSISTANT:" with no space (their conversation templates)."""

from tinylmm.data.templates.core import TEMPLATES, TINYLLAVA_SYSTEM, Template

# Phi-2 and StableLM-2: `<|endoftext|>` ends an answer.
TEMPLATES.register(
    "phi",
    Template(
        "phi",
        system=TINYLLAVA_SYSTEM,
        eos="<|endoftext|>",
        description="TinyLLaVA's USER/ASSISTANT format, answers end with <|endoftext|> (Phi-2, StableLM-2)",
    ),
)
# TinyLlama and the toy preset: bos from the tokenizer, `</s>`.
TEMPLATES.register(
    "llama",
    Template(
        "llama",
        system=TINYLLAVA_SYSTEM,
        eos="</s>",
        description="TinyLLaVA's USER/ASSISTANT format, answers end with </s> (TinyLlama, the toy)",
    ),
)
# Their `gemma` (<eos>) and `qwen2_instruct` (<|im_end|>) conversation versions; `tinylmm convert` picks it.
TEMPLATES.register(
    "tinyllava",
    Template(
        "tinyllava",
        system=TINYLLAVA_SYSTEM,
        description="TinyLLaVA's USER/ASSISTANT format, answers end with the tokenizer's eos (their gemma, "
        "qwen2_instruct)",
    ),
)
