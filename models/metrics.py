"""Segmentation quality per class and subject, and its summary over subjects (the definitions of MONAI's
metrics; tests/test_metrics.py checks them against MONAI's own functions).

Metrics per foreground class of a protocol (background, class 0, is not scored):

- ``dice``: 2|P∩T| / (|P| + |T|), in [0, 1].
- ``hd95_mm``: 95th-percentile symmetric Hausdorff distance between the class surfaces, mm.
- ``assd_mm``: average symmetric surface distance, mm.
- ``volume_pred_ml``, ``volume_true_ml``: class volume in prediction and truth, mL (1 mL = 1000 mm^3).
- ``abs_volume_diff_ml``: |volume_pred_ml - volume_true_ml|, mL.

Empty classes have defined values, never an exception:

- absent from both prediction and truth: ``dice = 1.0``, ``hd95_mm = assd_mm = 0.0`` (nothing to find,
  nothing found: a perfect result);
- absent from exactly one: ``dice = 0.0``, ``hd95_mm = assd_mm = NaN`` (a distance to an empty surface is
  undefined). Summaries skip NaN and report how many values they used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from common.boxes import bounding_box

METRICS: tuple[str, ...] = (
    "dice",
    "hd95_mm",
    "assd_mm",
    "volume_pred_ml",
    "volume_true_ml",
    "abs_volume_diff_ml",
)
"""The metrics ``segmentation_metrics`` reports for every class."""

MM3_PER_ML = 1000.0


def segmentation_metrics(
    pred: np.ndarray, truth: np.ndarray, class_names: Sequence[str], spacing_mm: Sequence[float]
) -> dict[str, dict[str, float]]:
    """Score a predicted label map against the true one, per foreground class.

    Args:
        pred: ``(X, Y, Z)`` integer class indices predicted.
        truth: ``(X, Y, Z)`` integer class indices, same grid.
        class_names: class index -> name, index 0 background (a protocol's ``class_names``).
        spacing_mm: voxel size along ``(X, Y, Z)``, mm; distances and volumes use it.

    Returns:
        ``{class_name: {metric: value}}`` for classes 1 .. K-1, metrics as in ``METRICS``.
    """
    from scipy import ndimage

    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} must be (X, Y, Z) of the same shape")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing_mm {spacing_mm} must be three positive voxel sizes")
    voxel_ml = math.prod(spacing) / MM3_PER_ML
    num_classes = len(class_names)
    for what, arr in (("pred", pred), ("truth", truth)):
        if arr.dtype.kind not in "iu" or (arr.size and not 0 <= arr.min() <= arr.max() < num_classes):
            raise ValueError(
                f"{what} must hold integer class indices 0..{num_classes - 1} ({', '.join(class_names)})"
            )
    # Bounding boxes of every class in one pass: each class is then scored on its small region only.
    boxes_pred = ndimage.find_objects(np.clip(pred, 0, num_classes).astype(np.int32), max_label=num_classes)
    boxes_true = ndimage.find_objects(np.clip(truth, 0, num_classes).astype(np.int32), max_label=num_classes)

    results: dict[str, dict[str, float]] = {}
    for cls in range(1, num_classes):
        # Grown by a voxel: every surface voxel lies inside, so the box's surfaces are the volume's.
        box = bounding_box((boxes_pred[cls - 1], boxes_true[cls - 1]), pred.shape, margin=1)
        p = pred[box] == cls if box is not None else np.zeros((0, 0, 0), bool)
        t = truth[box] == cls if box is not None else np.zeros((0, 0, 0), bool)
        n_pred, n_true = int(p.sum()), int(t.sum())
        scores = {
            "volume_pred_ml": n_pred * voxel_ml,
            "volume_true_ml": n_true * voxel_ml,
            "abs_volume_diff_ml": abs(n_pred - n_true) * voxel_ml,
        }
        if n_pred == 0 and n_true == 0:
            scores |= {"dice": 1.0, "hd95_mm": 0.0, "assd_mm": 0.0}
        elif n_pred == 0 or n_true == 0:
            scores |= {"dice": 0.0, "hd95_mm": math.nan, "assd_mm": math.nan}
        else:
            # The counts are at hand: MONAI's compute_dice would take the masks to float tensors again.
            scores["dice"] = 2.0 * int(np.count_nonzero(p & t)) / (n_pred + n_true)
            scores |= _surface_distances_mm(p, t, spacing)
        results[class_names[cls]] = {name: scores[name] for name in METRICS}
    return results


def _surface_distances_mm(pred, truth, spacing: tuple[float, ...]) -> dict[str, float]:
    """``hd95_mm`` and ``assd_mm`` of two non-empty boolean masks from one computation of their surface
    distances, as MONAI's ``compute_hausdorff_distance(percentile=95)`` and
    ``compute_average_surface_distance(symmetric=True)`` define them.

    MONAI's edges (``get_mask_edges``), then each direction's nearest-edge distances from a KD-tree over
    the other mask's edge voxels, in mm, as MONAI's ``get_surface_distance`` does on the CPU, except that
    the queries use every core: MONAI's run on one, and at 1 mm they are half of a subject's scoring time.
    """
    from monai.metrics.utils import get_mask_edges
    from scipy.spatial import KDTree

    with warnings.catch_warnings():
        # MONAI 1.6 deprecates the argument; it is kept so the edges are NumPy arrays in every version.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        edges = get_mask_edges(pred, truth, crop=True, always_return_as_numpy=True)
    scale = np.asarray(spacing, dtype=np.float64)
    points = [np.argwhere(edge).astype(np.float64) * scale for edge in edges]
    # Both masks are non-empty, so both have edge voxels and both directed distance sets are non-empty.
    distances = [
        KDTree(points[1 - side], leafsize=32).query(points[side], k=1, workers=-1)[0] for side in (0, 1)
    ]
    return {
        "hd95_mm": float(max(np.quantile(d, 0.95) for d in distances)),
        "assd_mm": float(np.concatenate(distances).mean()),
    }


def summarize(
    per_subject: Sequence[Mapping[str, Mapping[str, float]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Statistics over subjects of ``segmentation_metrics`` results.

    Args:
        per_subject: one ``{class_name: {metric: value}}`` per subject.

    Returns:
        ``{class_name: {metric: {"mean", "sd", "median", "n"}}}``, where ``n`` counts the subjects with a
        finite value; NaN values (undefined distances) are left out, and all three statistics are NaN when
        ``n == 0``. ``sd`` is the sample standard deviation (NaN when ``n < 2``).
    """
    summary: dict[str, dict[str, dict[str, float]]] = {}
    class_names = list(dict.fromkeys(name for subject in per_subject for name in subject))
    for name in class_names:
        metrics = list(dict.fromkeys(m for subject in per_subject if name in subject for m in subject[name]))
        summary[name] = {}
        for metric in metrics:
            values = np.array(
                [float(s[name][metric]) for s in per_subject if name in s and metric in s[name]], dtype=float
            )
            finite = values[np.isfinite(values)]
            n = int(finite.size)
            summary[name][metric] = {
                "mean": float(finite.mean()) if n else math.nan,
                "sd": float(finite.std(ddof=1)) if n > 1 else math.nan,
                "median": float(np.median(finite)) if n else math.nan,
                "n": n,
            }
    return summary
