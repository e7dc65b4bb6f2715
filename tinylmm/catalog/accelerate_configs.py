"""accelerate config files for scale-out, shipped in tinylmm/assets/accelerate/: DDP,
FSDP2 and DeepSpeed ZeRO-2/ZeRO-3 (each with and without CPU offload).

They are accelerate's own `accelerate config` format (a `ClusterConfig` YAML), read by
`accelerate launch --config_file FILE`; each file's header says what it does and how to
launch it. `tinylmm ls accelerate` lists them, `tinylmm cp NAME DEST` copies one to edit
(e.g. the multi-node fields: num_machines, machine_rank, main_process_ip/port, same_network).
"""

from __future__ import annotations

from pathlib import Path

from tinylmm.errors import unknown
from tinylmm.files import copy_new
from tinylmm.resources import asset


def shipped() -> dict[str, Path]:
    return {p.stem: p for p in sorted(asset("accelerate").glob("*.yaml"))}


def description(path: Path) -> str:
    """The header's first sentence, without the `tinylmm: ` prefix every file has."""
    first = path.read_text().splitlines()[0]
    return first.lstrip("# ").removeprefix("tinylmm: ").strip()


def copy(name: str, dest: str | Path) -> Path:
    """Copy the shipped config `name` to `dest` (a file, or a directory to put it in); never overwrites."""
    table = shipped()
    if name not in table:
        raise unknown("accelerate config", name, table)
    return copy_new(table[name], dest)
