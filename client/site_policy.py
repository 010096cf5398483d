"""What a site decides for itself, whatever the coordinator asks: its split, which evaluations it
answers, and the resources one run may take.

The coordinator sends the run's settings in every message; a curious or careless coordinator could ask
for a one-subject test set (whose Dice is that person's anatomy), an evaluation of any model it crafts,
as often as it likes, or for rounds, steps and grids that exhaust the site's machine. So these are the
site's own, in its node config (deployed) with safe defaults; a simulated site, whose data the
researcher holds anyway, takes the study's settings (`RunConfig.test_fraction`,
``simulated-min-test-subjects``) and the same caps.

Node config keys (all optional): ``test-fraction`` (0.25), ``min-test-subjects`` (5 persons; below it
the site answers no evaluation), ``max-evaluations`` (20 per run), and one ``max-*`` / ``min-spacing-mm``
key per resource setting (`RESOURCE_CAP_KEYS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from contract.run_config import RunConfig
from models.errors import NeurofedError

DEPLOYED_TEST_FRACTION = 0.25
DEPLOYED_MIN_TEST_SUBJECTS = 5
DEPLOYED_MAX_EVALUATIONS = 20


@dataclass(frozen=True)
class ResourceCaps:
    """The largest run a site takes part in; a message beyond any cap is refused with the reason.

    Attributes:
        max_rounds: rounds of the run (``num-rounds``).
        max_local_steps: optimizer steps per round (``local-steps``).
        max_batch_size: patches per step (``batch-size``).
        max_patch_size: edge of a training patch, voxels (``patch-size``).
        min_spacing_mm: the finest voxel the site resamples to, mm (``spacing-mm``).
        max_grid_voxels: voxels of the preprocessing grid (field of view / spacing), which bounds the
            memory of preprocessing and of sliding-window evaluation.
    """

    max_rounds: int = 500
    max_local_steps: int = 2000
    max_batch_size: int = 16
    max_patch_size: int = 160
    min_spacing_mm: float = 0.7
    max_grid_voxels: int = 320**3

    def violations(self, run: RunConfig) -> list[str]:
        """One sentence per setting of ``run`` beyond a cap (empty when the run fits)."""
        from client.site_data import run_preprocessing_plan

        asked = {
            "max_rounds": run.num_rounds,
            "max_local_steps": run.local_steps,
            "max_batch_size": run.batch_size,
            "max_patch_size": run.patch_size,
            "max_grid_voxels": math.prod(run_preprocessing_plan(run).grid_shape),
        }
        out = [
            f"{_SETTING_OF[cap]} = {value} is above the site's {RESOURCE_CAP_KEYS[cap]} = {getattr(self, cap)}"
            for cap, value in asked.items()
            if value > getattr(self, cap)
        ]
        if run.spacing_mm < self.min_spacing_mm:
            out.append(
                f"spacing-mm = {run.spacing_mm} is finer than the site's min-spacing-mm = {self.min_spacing_mm}"
            )
        return out


RESOURCE_CAP_KEYS = {f.name: f.name.replace("_", "-") for f in fields(ResourceCaps)}
"""Node config key of each cap (``max_local_steps`` -> ``max-local-steps``)."""
POLICY_KEYS = ("test-fraction", "min-test-subjects", "max-evaluations", *RESOURCE_CAP_KEYS.values())
"""Every node-config key of the site's policy (`neurofed-site start --policy KEY=VALUE`)."""


def parse_policy_options(options: list[str] | tuple[str, ...]) -> dict[str, float]:
    """``["min-test-subjects=8", ...]`` -> ``{"min-test-subjects": 8.0}``, checked as a deployed policy."""
    values: dict[str, float] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in POLICY_KEYS:
            raise NeurofedError(
                f"--policy {option!r}: expected KEY=VALUE with KEY one of {', '.join(POLICY_KEYS)}"
            )
        try:
            values[key] = float(value)
        except ValueError as exc:
            raise NeurofedError(f"--policy {option!r}: {value!r} is not a number") from exc
    deployed_policy(values)  # the site must accept what it is started with
    return values


_SETTING_OF = {
    "max_rounds": "num-rounds",
    "max_local_steps": "local-steps",
    "max_batch_size": "batch-size",
    "max_patch_size": "patch-size",
    "max_grid_voxels": "the preprocessing grid (field-of-view-mm / spacing-mm), in voxels,",
}


@dataclass(frozen=True)
class SitePolicy:
    """The site's own rules for a run (see the module docstring).

    Attributes:
        test_fraction: share of the site's persons held out for testing (a holdout site tests on all).
        min_test_subjects: persons the test split needs before the site reports any test metric.
        max_evaluations: evaluations (distinct rounds) the site answers per run.
        caps: the largest run the site takes part in.
    """

    test_fraction: float = DEPLOYED_TEST_FRACTION
    min_test_subjects: int = DEPLOYED_MIN_TEST_SUBJECTS
    max_evaluations: int = DEPLOYED_MAX_EVALUATIONS
    caps: ResourceCaps = ResourceCaps()

    def refusal(self, run: RunConfig) -> str | None:
        """Why the site takes no part in ``run`` (its resource settings), or None."""
        beyond = self.caps.violations(run)
        if not beyond:
            return None
        return (
            "the run asks for more than this site allows: "
            + "; ".join(beyond)
            + " (the site operator raises a cap in the node config, or the coordinator lowers the setting)"
        )


def deployed_policy(node_config: Mapping[str, Any]) -> SitePolicy:
    """The policy in a deployed site's node config; defaults for what it does not set."""
    caps = ResourceCaps(
        **{
            cap: _number(node_config, key, type(getattr(ResourceCaps, cap)))
            for cap, key in RESOURCE_CAP_KEYS.items()
            if key in node_config
        }
    )
    policy = SitePolicy(
        test_fraction=_number(node_config, "test-fraction", float, DEPLOYED_TEST_FRACTION),
        min_test_subjects=_number(node_config, "min-test-subjects", int, DEPLOYED_MIN_TEST_SUBJECTS),
        max_evaluations=_number(node_config, "max-evaluations", int, DEPLOYED_MAX_EVALUATIONS),
        caps=caps,
    )
    if not 0.0 < policy.test_fraction < 1.0:
        raise NeurofedError(
            f"node config 'test-fraction' must be between 0 and 1, got {policy.test_fraction}"
        )
    if policy.min_test_subjects < 1 or policy.max_evaluations < 0:
        raise NeurofedError("node config 'min-test-subjects' must be >= 1 and 'max-evaluations' >= 0")
    return policy


def simulated_policy(run: RunConfig) -> SitePolicy:
    """A simulated site's policy: the study's split settings, one evaluation per round, the default caps."""
    return SitePolicy(
        test_fraction=run.test_fraction,
        min_test_subjects=run.simulated_min_test_subjects,
        max_evaluations=run.num_rounds,
    )


def _number(node_config: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    if key not in node_config:
        return default
    try:
        return kind(node_config[key])
    except (TypeError, ValueError) as exc:
        raise NeurofedError(f"node config {key!r} must be a number, got {node_config[key]!r}") from exc
