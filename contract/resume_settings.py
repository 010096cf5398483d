"""What a resumed run may change: the few settings that do not alter what the interrupted run computed.

A resumed run repeats the interrupted one's stored settings (config.json) but for `RESUMABLE_SETTINGS`;
the coordinator's CLI encodes the requested changes (`encode_resume_settings`), the ServerApp decodes
them and the run merges them into the stored settings (`resumed_config`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from contract.run_config import RunConfig, flower_key
from models.errors import NeurofedError

RESUMABLE_SETTINGS = frozenset({"num-server-rounds", "num-sites", "min-sites", "round-timeout-s"})
"""Run settings (flat Flower keys) a resumed run may change: its number of rounds, and how many sites it
waits for, needs and waits on. Every other setting repeats the interrupted run. With another number of
rounds each site re-plans its DP noise so that the whole run keeps its target ε, or refuses with the
reason (client/private_round.py)."""


RESUME_SETTINGS_KEY = "resume-settings"
"""Flower run-config key (string): with ``resume``, the `RESUMABLE_SETTINGS` that change, as a JSON object
of flat keys (empty: none). A key of its own, because Flower hands the app every setting of pyproject.toml
whether or not it was asked for."""


def encode_resume_settings(changes: Mapping[str, Any]) -> str:
    """The `RESUME_SETTINGS_KEY` value of ``changes`` (flat keys); NeurofedError for a setting that may not
    change on resume."""
    fixed = sorted(set(changes) - RESUMABLE_SETTINGS)
    if fixed:
        raise NeurofedError(
            f"a resumed run keeps the settings it was started with, so {fixed} cannot be changed; only "
            f"{sorted(RESUMABLE_SETTINGS)} may (start a new run for other settings)"
        )
    return json.dumps(dict(changes), sort_keys=True) if changes else ""


def decode_resume_settings(text: str) -> dict[str, Any]:
    """The changes encoded by `encode_resume_settings` (checked the same way)."""
    try:
        changes = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise NeurofedError(f"run setting {RESUME_SETTINGS_KEY!r}: not a JSON object ({exc})") from exc
    if not isinstance(changes, dict):
        raise NeurofedError(f"run setting {RESUME_SETTINGS_KEY!r}: expected a JSON object, got {text!r}")
    encode_resume_settings(changes)
    return changes


def resumed_config(stored: RunConfig, wanted: RunConfig) -> RunConfig:
    """The settings of a resumed run: ``stored`` (the interrupted run's), with `RESUMABLE_SETTINGS` and
    ``run_dir`` from ``wanted``."""
    names = {f.name for f in fields(RunConfig) if flower_key(f.name) in RESUMABLE_SETTINGS | {"run-dir"}}
    return stored.replace(**{name: getattr(wanted, name) for name in names})
