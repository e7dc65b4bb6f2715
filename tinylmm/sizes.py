"""Byte sizes as people write them, and back."""

from __future__ import annotations

import re

from tinylmm.errors import ConfigError

MiB = 2**20
GiB = 2**30

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": MiB,
    "mb": MiB,
    "mib": MiB,
    "g": GiB,
    "gb": GiB,
    "gib": GiB,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """'24GB', '16GiB', '12000MB', '1.5g' -> bytes. GPU memory is sold in binary units (a
    "24GB" card has 24 GiB), so GB and GiB both mean 2**30 here."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"budget '{text}' is not a size such as 24GB, 16GiB or 12000MB")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n else "0"
