"""Which parameters train in a stage, and how each one is stored: the rules of
tinylmm.trainability and tinylmm.models.adapters (the same functions), applied to the meta
model."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tinylmm import trainability
from tinylmm.errors import ConfigError
from tinylmm.memory.arch import MetaModel
from tinylmm.models.adapters import resolve_targets
from tinylmm.schema import RunConfig

HALF = {"bf16": 2, "fp16": 2}  # bytes per element of the mixed-precision dtypes


@dataclass
class ComponentState:
    """One component (vision, connector, llm) in one stage."""

    mode: str  # frozen | full | partial | lora | qlora: the stage's setting
    structure: str  # plain | lora | qlora: adapters persist through later frozen stages
    trainable: set  # ids of trainable base parameters
    lora: dict  # module name -> (in, out) of each linear layer with an adapter
    lora_trainable: bool
    quantized: set  # ids of base weights stored as bitsandbytes k-bit blocks
    kbit_prepared: bool  # the rest cast to fp32 by peft's prepare_model_for_kbit_training
    copies: set = field(default_factory=set)  # lora.modules_to_save: params with a trained full copy

    def trains(self, p) -> bool:
        """Does this parameter (or the copy peft trains in its place) get a gradient?"""
        return id(p) in self.trainable or (self.lora_trainable and id(p) in self.copies)

    def bytes_per_element(self, p, half: int | None, bits: int) -> float:
        """How the training code stores `p`: k-bit blocks; fp32 when it trains, after k-bit
        preparation or in an fp32 run; else the half dtype (frozen weights under bf16/fp16)."""
        if id(p) in self.quantized:
            return 0.5 if bits == 4 else 1.0
        if self.trains(p) or self.kbit_prepared or not half:
            return 4
        return half


def _lora_targets(module: nn.Module, targets: list[str], is_llm: bool) -> dict:
    """The linear layers peft puts an adapter on (never the LM head), as the training code
    resolves `lora.targets` -> module name: (in, out)."""
    head = module.get_output_embeddings() if is_llm else None
    names = set(resolve_targets(module, targets, "llm" if is_llm else "vision tower", exclude=head))
    return {
        name: (m.in_features, m.out_features)
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and m is not head and name.rsplit(".", 1)[-1] in names
    }


def component_state(meta: MetaModel, cfg: RunConfig, stage: str, comp: str) -> ComponentState:
    where = f"stages.{stage}.tune.{comp}"
    t = trainability.mode(cfg.stages[stage], comp, f"stages.{stage}")
    structure = trainability.structures(cfg, comp)[stage] if comp != "connector" else "plain"
    module = meta.component(comp)
    trainable: set = set()
    if t.mode == "full":
        trainable = {id(p) for p in module.parameters()}
    elif t.mode == "partial":
        trainable = {id(p) for p in trainability.partial_parameters(meta, comp, t, where)}
    lora, quantized, copies = {}, set(), set()
    if structure in ("lora", "qlora"):
        lora = _lora_targets(module, cfg.lora.targets, comp == "llm")
        if not lora:
            raise ConfigError(f"lora.targets {cfg.lora.targets} match no linear layer of the {comp}")
        if comp == "llm":
            for name, m in module.named_modules():
                if any(name == k or name.endswith("." + k) for k in cfg.lora.modules_to_save):
                    copies |= {id(p) for p in m.parameters()}
    if structure == "qlora":
        head = module.get_output_embeddings()
        quantized = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear) and m is not head}
    return ComponentState(t.mode, structure, trainable, lora, t.adapters, quantized, structure == "qlora", copies)
