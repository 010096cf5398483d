"""Append-only JSON-lines files (a run's metrics.jsonl, the coordinator's audit.jsonl).

Each record is one line, appended with ``O_APPEND`` and flushed to disk before the call returns, so a
crash loses at most the line being written, and concurrent writers (a ServerApp and an operator command)
never overwrite each other. Readers skip a torn last line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats (not JSON; e.g. HD95 of a class a prediction misses) as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def append_json_line(path: Path, record: Mapping[str, Any], mode: int = 0o644) -> None:
    """Append ``record`` (made JSON-safe, keys sorted) as one line and fsync it; creates the folder."""
    line = json.dumps(json_safe(dict(record)), sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Every record in ``path`` in order ([] when there is no file; a torn line is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
