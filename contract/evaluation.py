"""The schema of ``evaluation.json``: the cross-site study evaluation the report reads.

Written by study/study_evaluation.py (it needs every site's data), read by server/report/ (which never
does). Top-level keys::

    format, format_version        `FORMAT`, `FORMAT_VERSION`
    protocol, classes, metrics    the label protocol, its foreground classes, `REPORTED_METRICS`
    units, grid                   units per metric; the grid the metrics were computed on
    global_model_rounds, data_root, budget
    sites      [{site, role, train_subjects, test_subjects, chance_mean_dice: {subject: dice}}]
    models     [{name, ...}]      every model scored (its provenance)
    results    [{model, site, role, subject, mean_dice, metrics: {class: {metric: value | null}}}]
    qc         [{site, subject, model, file}]
    membership_audit              study/membership_audit.py's result
    native_results  `NATIVE_RESULTS`: the unseen sites' subjects scored on each scan's own voxel grid
                    [{model, site, role, subject, mean_dice, spacing_mm, metrics}] (study/native_scoring.py)
    native_ceiling  `NATIVE_CEILING`: [{site, role, subject, mean_dice, spacing_mm, metrics}] of a
                    segmentation perfect on the working grid, mapped onto the scan (the partial-volume limit)

The two native keys are absent from documents written before they existed.

A model is `FEDERATED`, `POOLED`, ``local-only:<site>`` (`local_model_name`), `STARTING` (the starting
model alone), `FEDERATED_WITHOUT_DP` (the same configuration without DP), `PERSONALISED`, or any other
name the report shows beside them; its ``models`` entry's ``kind`` says what it is (`STARTING_KIND` for the
starting model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMAT = "neurofed-evaluation"
FORMAT_VERSION = 1
FEDERATED = "federated"
POOLED = "pooled"
LOCAL_PREFIX = "local-only:"
STARTING = "starting-model"
"""The run's starting model alone (``initial-model``), without any site's data: what federating adds to it."""
FEDERATED_WITHOUT_DP = "federated-no-dp"
"""The same run's configuration trained without DP (a study's comparison arm): what DP costs."""
PERSONALISED = "personalised"
"""FedBN: each training site's own model (its normalization layers + the final global rest), scored on
that site's test split only."""
STARTING_KIND = "starting"
"""The ``kind`` of the run's starting model (its initial weights) where evaluation.json scores it."""
NATIVE_RESULTS = "native_results"
NATIVE_CEILING = "native_ceiling"
REPORTED_METRICS: tuple[str, ...] = ("dice", "hd95_mm", "assd_mm", "abs_volume_diff_ml")


def local_model_name(site_id: str) -> str:
    """The evaluation.json name of a site's local-only model."""
    return f"{LOCAL_PREFIX}{site_id}"


def finite_or_none(value: float) -> float | None:
    """A value as evaluation.json stores it: the float, or null where it is undefined (NaN, infinite)."""
    return float(value) if math.isfinite(value) else None


def result_record(scores: Mapping[str, Mapping[str, float]], **identity: Any) -> dict[str, Any]:
    """One record of ``results`` (or `NATIVE_RESULTS`, `NATIVE_CEILING`): ``identity`` (model, site, role,
    subject, ...), ``mean_dice`` over the foreground classes of ``scores`` ({class: {metric: value}}, as
    `models.metrics.segmentation_metrics` gives them) and ``metrics``, the `REPORTED_METRICS` of each class,
    undefined values as null."""
    return {
        **identity,
        "mean_dice": float(np.mean([v["dice"] for v in scores.values()])),
        "metrics": {
            c: {m: finite_or_none(values[m]) for m in REPORTED_METRICS} for c, values in scores.items()
        },
    }
