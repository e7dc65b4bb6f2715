"""A run's resolved config on disk: YAML with, on each value, the layer that set it."""

from __future__ import annotations

from pathlib import Path

import yaml

from tinylmm.config.validate import validate
from tinylmm.schema import RunConfig, from_dict, is_atomic, to_dict


def dump_resolved(cfg: RunConfig, sources: dict[str, str], path: Path) -> None:
    """Write the resolved config as YAML, each value annotated with the layer that set it.
    A source key that starts with "#" is a comment line of the header (`# --tune auto: ...`,
    the choice tinylmm.config.tune_auto made)."""
    lines = [
        "# tinylmm resolved run config. Layers, later wins: defaults < preset < recipe <",
        "# preset stage_defaults < override. The comment on a value names the layer that set it",
        "# (no comment: the default). Re-run with: tinylmm train --config THIS_FILE",
    ]
    lines += [f"{key}: {' '.join(str(text).splitlines())}" for key, text in sources.items() if key.startswith("#")]

    def emit(node: dict, indent: int, prefix: str):
        for k, v in node.items():
            key = f"{prefix}{k}"
            pad = "  " * indent
            if isinstance(v, dict) and v and not is_atomic(key.split(".")):
                src = sources.get(key)
                lines.append(f"{pad}{k}:" + (f"  # {src}" if src else ""))
                emit(v, indent + 1, key + ".")
            else:
                src = sources.get(key)
                lines.append(f"{pad}{k}: {_flow(v)}" + (f"  # {src}" if src else ""))

    emit(to_dict(cfg), 0, "")
    path.write_text("\n".join(lines) + "\n")


def _flow(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-3].strip() if text.endswith("...") else text


def load_resolved(path: Path) -> RunConfig:
    data = yaml.safe_load(Path(path).read_text())
    cfg = from_dict(RunConfig, data, where=str(path))
    validate(cfg)
    return cfg
