"""Synthesized site folders a benchmark writes once and reuses on later runs with the same settings."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

STAMP = ".bench-settings.json"
"""The file in the data root that records the settings its sites were synthesized with."""


def synthesize_once(data_root: Path, **settings: Any) -> Path:
    """``study.synthesis.synthesize_sites(data_root, **settings)``, skipped where ``data_root`` already holds
    sites an earlier call wrote with the same settings; returns ``data_root``."""
    from study.synthesis import synthesize_sites

    stamp = data_root / STAMP
    wanted = json.loads(json.dumps(settings, default=str))  # paths as strings, as the stamp holds them
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        print(f"reusing the synthesized sites in {data_root}", flush=True)
        return data_root
    started = time.perf_counter()
    synthesize_sites(data_root, overwrite=True, **settings)
    stamp.write_text(json.dumps(wanted))
    print(
        f"synthesized {settings['n_sites']} sites x {settings['subjects_per_site']} subjects "
        f"in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return data_root
