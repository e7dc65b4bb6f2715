"""The connector registry: vision features [B, N, Dv] -> visual tokens [B, M, Dl].

A connector is an `nn.Module` registered under its exact name. It declares its options as
a dataclass (`Options`; the keys of `model.connector` besides `type`), is built as
`cls(options, vision_dim, llm_dim)`, says how many tokens it outputs (`output_len`), and
tells the memory planner what its forward saves for backward: `trace(ctx)` replays the
forward on the planner's tracers (tinylmm/memory/activations.py, ConnectorTrace) and returns
the output per visual token. A connector whose weights depend on the tower's patch count
sets `takes_num_patches = True` and is built with `num_patches=N` as well.

Two class attributes/methods make a connector describable and checkable before it is built:
`tokens_out` states its output-length rule in words (`tinylmm ls connectors` prints it
beside the options and their defaults, read from `Options`), and a connector whose design
needs a particular grid of patches defines `check_patches(options, num_patches)`, raising
a ConfigError that names `model.connector.<key>`, the tower's grid and the values that work
(the config is validated against the tower's architecture with it, and `output_len` calls
it again at build).
"""

from __future__ import annotations

import dataclasses
import math
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
    """The connector of `spec`. One whose weights depend on the tower's patch count (a
    position embedding per patch) says `takes_num_patches = True` and is built as
    `cls(options, vision_dim, llm_dim, num_patches=N)`."""
    cls = CONNECTORS.get(spec.type, "model.connector.type")
    if not getattr(cls, "takes_num_patches", False):
        return cls(connector_options(spec), vision_dim, llm_dim)
    if num_patches is None:
        raise ConfigError(f"connector '{spec.type}' is built for a tower's patch count: pass num_patches")
    return cls(connector_options(spec), vision_dim, llm_dim, num_patches=num_patches)


def describe(cls) -> str:
    """A connector's line in `tinylmm ls connectors`: what it is, its options with their
    defaults (from its `Options` dataclass), and its output-length rule (`tokens_out`)."""
    fields = dataclasses.fields(cls.Options)
    options = ", ".join(f"{f.name}={f.default}" for f in fields) or "none"
    first = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    return f"{first} | options: {options} | tokens out: {getattr(cls, 'tokens_out', 'not stated')}"


def check_patches(spec: ConnectorSpec, num_patches: int) -> None:
    """The connector's grid check (`check_patches`) for a tower handing it `num_patches`."""
    cls = CONNECTORS.get(spec.type, "model.connector.type")
    if hasattr(cls, "check_patches"):
        cls.check_patches(connector_options(spec), num_patches)


def grid_side(num_patches: int, connector: str) -> int:
    """The side of the square grid of `num_patches` tokens; a ConfigError when it is not square."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ConfigError(
            f"model.connector.type={connector} reads the patches as a square grid; the tower hands it "
            f"{num_patches} tokens, not a square (model.vision.select=patch drops a CLS token; "
            "cls_patch and drop_first change the count)"
        )
    return side
