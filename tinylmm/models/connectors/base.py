"""The connector registry: vision features [B, N, Dv] -> visual tokens [B, M, Dl].

A connector is an `nn.Module` registered under its exact name. It declares its options as
a dataclass (`Options`; the keys of `model.connector` besides `type`), is built as
`cls(options, vision_dim, llm_dim)` (plus `num_patches=`, the tower's patch count, for a
connector whose `__init__` takes it: a position embedding per patch), says how many tokens
it outputs (`output_len`), and tells the memory planner what its forward saves for backward: `trace(ctx)` replays the
forward on the planner's tracers (tinylmm/memory/activations.py, ConnectorTrace) and returns
the output per visual token.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

from torch import nn

from tinylmm.errors import ConfigError, did_you_mean
from tinylmm.registry import Registry
from tinylmm.schema import ConnectorSpec, from_dict

CONNECTORS: Registry[type[nn.Module]] = Registry("connector")


@dataclass
class NoOptions:
    """A connector without options of its own."""


def connector_options(spec: ConnectorSpec):
    """`spec`'s options as the connector's own dataclass: an unknown key or a wrong value is
    a ConfigError naming `model.connector.<key>`."""
    cls = CONNECTORS.get(spec.type, "model.connector.type")
    names = [f.name for f in dataclasses.fields(cls.Options)]
    for key in spec.options:
        if key not in names:
            takes = f"takes {', '.join(names)}{did_you_mean(key, names)}" if names else "takes no options"
            raise ConfigError(f"unknown key 'model.connector.{key}': connector '{spec.type}' {takes}")
    return from_dict(cls.Options, spec.options, "model.connector")


def build_connector(spec: ConnectorSpec, vision_dim: int, llm_dim: int, num_patches: int | None = None) -> nn.Module:
    cls = CONNECTORS.get(spec.type, "model.connector.type")
    if "num_patches" in inspect.signature(cls.__init__).parameters:
        return cls(connector_options(spec), vision_dim, llm_dim, num_patches=num_patches)
    return cls(connector_options(spec), vision_dim, llm_dim)
