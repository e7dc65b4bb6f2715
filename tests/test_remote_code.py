"""`model.llm.trust_remote_code`: off by default, a model that ships its own code is refused
with an error naming the key (and its code is not run); on, that code loads the model."""

import json
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tinylmm.errors import ConfigError
from tinylmm.models.llm import build_llm
from tinylmm.schema import LLMSpec


@pytest.fixture
def remote_code_llm(tmp_path):
    """A tiny Llama saved as a custom architecture whose code lives beside its weights (auto_map)."""
    d = tmp_path / "custom-llm"
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(d)
    marker = tmp_path / "code-ran"
    (d / "configuration_custom.py").write_text(
        textwrap.dedent(f"""
        import pathlib
        from transformers import LlamaConfig
        pathlib.Path({str(marker)!r}).write_text("yes")  # proof that this file was executed
        class CustomConfig(LlamaConfig):
            model_type = "custom_llama"
        """)
    )
    (d / "modeling_custom.py").write_text(
        textwrap.dedent("""
        from transformers import LlamaForCausalLM
        from .configuration_custom import CustomConfig
        class CustomForCausalLM(LlamaForCausalLM):
            config_class = CustomConfig
        """)
    )
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "custom_llama"
    cfg["architectures"] = ["CustomForCausalLM"]
    cfg["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    (d / "config.json").write_text(json.dumps(cfg))
    return d, marker


def test_a_model_with_its_own_code_is_refused_by_default_and_its_code_not_run(remote_code_llm):
    path, marker = remote_code_llm
    assert LLMSpec().trust_remote_code is False
    with pytest.raises(ConfigError, match=r"ships its own Python code .*model\.llm\.trust_remote_code=true"):
        build_llm(LLMSpec(name_or_path=str(path)))
    assert not marker.exists()


def test_trust_remote_code_runs_the_models_code(remote_code_llm):
    path, marker = remote_code_llm
    llm = build_llm(LLMSpec(name_or_path=str(path), trust_remote_code=True))
    assert type(llm).__name__ == "CustomForCausalLM" and marker.read_text() == "yes"
    reference = LlamaForCausalLM.from_pretrained(path, config=LlamaConfig.from_pretrained(path))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(llm(ids).logits, reference(ids).logits)  # the saved weights, loaded
