"""Command-line options generated from `contract.run_config.RunConfig`: one option per run setting,
named by its Flower key (``--local-steps``), with the help text of the field's docstring entry.

A few settings keep the short names `neurofed simulate` has always had (`SHORT_NAMES`, e.g. ``--sites``
for ``num-sites``); both spellings work. An option left out keeps the RunConfig default.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, fields
from typing import Any

from contract.run_config import RunConfig, flower_key, setting_choices

SHORT_NAMES: Mapping[str, str] = {
    "num_rounds": "--rounds",
    "num_sites": "--sites",
    "unseen_sites": "--unseen",
    "network_preset": "--preset",
    "server_learning_rate": "--server-lr",
    "spacing_mm": "--spacing",
    "simulated_subjects_per_site": "--subjects-per-site",
    "simulated_unseen_subjects": "--unseen-subjects",
    "field_of_view_mm": "--fov",
    "dp_target_epsilon": "--target-epsilon",
    "dp_noise_multiplier": "--noise-multiplier",
    "dp_delta": "--delta",
    "dp_max_grad_norm": "--max-grad-norm",
    "server_dp_noise_multiplier": "--server-dp-noise",
    "server_dp_clipping_norm": "--server-dp-clip",
}


def field_help() -> dict[str, str]:
    """Each RunConfig field's docstring entry (``Attributes:`` section), joined into one line."""
    doc = RunConfig.__doc__ or ""
    entries: dict[str, str] = {}
    current = None
    for line in doc.split("Attributes:", 1)[-1].splitlines():
        m = re.match(r"^ {8}(\w+): (.*)$", line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2).strip()
        elif current and line.startswith(" " * 12):
            entries[current] += " " + line.strip()
    return entries


def add_run_config_options(parser: argparse.ArgumentParser, exclude: Iterable[str] = ()) -> None:
    """Add one option per RunConfig field (except ``exclude``); unset options are absent from the args."""
    helps = field_help()
    defaults = RunConfig()
    for f in fields(RunConfig):
        if f.name in exclude:
            continue
        names = [n for n in (SHORT_NAMES.get(f.name), f"--{flower_key(f.name)}") if n]
        default = getattr(defaults, f.name) if f.default is not MISSING else None
        kind = type(default)
        text = f"{helps.get(f.name, f.name)} (default: {default!r})"
        common: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if kind is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
        else:
            parser.add_argument(*names, type=kind, choices=setting_choices().get(f.name), **common)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields the command line set (by field name)."""
    names = {f.name for f in fields(RunConfig)}
    return {k: v for k, v in vars(args).items() if k in names}
