"""Layered mappings that remember which layer set each value, and `key=value` overrides."""

from __future__ import annotations

import copy
import re
from typing import Any

from tinylmm.errors import ConfigError
from tinylmm.schema import is_atomic, load_yaml


def parse_override(text: str) -> tuple[list[str], Any]:
    """`stages.finetune.lr=1e-4` -> (["stages", "finetune", "lr"], 0.0001). Values are YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    path = [p.strip() for p in key.strip().split(".")]
    if path == [""]:
        raise ConfigError(f"override '{text}' has an empty key")
    if "" in path:
        raise ConfigError(
            f"override '{text}': the key '{key.strip()}' has an empty part (two dots, or a dot at an end)"
        )
    value = load_yaml(raw, f"override '{text}': value") if raw.strip() else None
    return path, yaml11_floats(value)


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def yaml11_floats(value):
    """YAML 1.1 reads 1e-4 and 1e-06 as strings; numbers written that way are meant as
    floats, at any depth (an inline architecture config: `{layer_norm_eps: 1e-06}`)."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: yaml11_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [yaml11_floats(v) for v in value]
    return value


class Layers:
    """Merges mappings layer by layer and remembers which layer set each leaf."""

    def __init__(self):
        self.data: dict = {}
        self.sources: dict[str, str] = {}

    def apply(self, mapping: dict, source: str, prefix: tuple[str, ...] = ()):
        node = self.data
        for p in prefix:
            node = node.setdefault(p, {})
        self._merge(node, mapping, source, list(prefix))

    def set(self, path: list[str], value, source: str):
        node = self.data
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{'.'.join(path)}': '{p}' is a value, not a section")
            node = nxt
        if isinstance(value, dict) and not is_atomic(path) and isinstance(node.get(path[-1], {}), dict):
            self._merge(node.setdefault(path[-1], {}), value, source, list(path))
        else:
            self._forget(path)
            node[path[-1]] = copy.deepcopy(value)
            self.sources[".".join(path)] = source

    def set_by(self, path: list[str], source: str) -> bool:
        """Whether the value at `path` was set by the layer `source`."""
        return self.sources.get(".".join(path)) == source

    def _merge(self, node: dict, mapping: dict, source: str, path: list[str]):
        for k, v in mapping.items():
            sub = path + [str(k)]
            if isinstance(v, dict) and not is_atomic(sub) and isinstance(node.get(k, {}), dict):
                self._merge(node.setdefault(k, {}), v, source, sub)
            else:
                self._forget(sub)
                node[k] = copy.deepcopy(v)  # never alias a layer's data (the zoo is cached)
                self.sources[".".join(sub)] = source

    def _forget(self, path: list[str]):
        prefix = ".".join(path) + "."
        for key in [k for k in self.sources if k.startswith(prefix)]:
            del self.sources[key]
