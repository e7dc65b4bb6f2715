"""JSON-lines files (metrics.jsonl, LLaVA answer files), read with errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path

from tinylmm.errors import DataError


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file, one JSON object a line (blank lines skipped); a line
    that is not one is a DataError naming the file and the line."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: a record is a JSON object, got {type(record).__name__}")
        records.append(record)
    return records
