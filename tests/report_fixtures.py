"""The small `neurofed simulate` run the report tests share: 2 training sites + 1 unseen, 2 rounds, the tiny
network on 20^3-voxel phantoms written by tests/test_federation.py's helper, without DP."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from test_federation import _write_tiny_sites

SITES, UNSEEN, ROUNDS, LOCAL_STEPS = 3, 1, 2, 3


def simulate_study(root: Path, run: Path, *options: str) -> dict[str, Any]:
    """Run `neurofed simulate` into ``run`` on phantom sites written under ``root/data``, with the extra
    command-line ``options``; returns the run directory, what the command printed, evaluation.json and the
    events of metrics.jsonl."""
    from study.cli import main

    _write_tiny_sites(root / "data", SITES, 3)
    argv = [
        "simulate",
        "--out", str(run),
        "--data-root", str(root / "data"),
        "--sites", str(SITES),
        "--unseen", str(UNSEEN),
        "--rounds", str(ROUNDS),
        "--local-steps", str(LOCAL_STEPS),
        "--preset", "tiny",
        "--patch-size", "16",
        "--batch-size", "1",
        "--test-fraction", "0.34",
        "--spacing", "4",
        "--fov", "64,64,64",
        "--initial-model", "none",
        "--no-dp",
        *options,
    ]  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return {
        "run": run,
        "printed": printed.getvalue(),
        "evaluation": json.loads((run / "evaluation.json").read_text()),
        "events": [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()],
    }
