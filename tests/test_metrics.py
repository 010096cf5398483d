"""Segmentation metrics against cases whose values follow from geometry, and their empty-class rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.metrics import METRICS, segmentation_metrics, summarize

CLASSES = ("background", "first", "second")


def _cube(shape: tuple[int, int, int], corner: tuple[int, int, int], side: int, cls: int = 1) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    x, y, z = corner
    labels[x : x + side, y : y + side, z : z + side] = cls
    return labels


def test_cube_shifted_along_the_finest_axis_has_geometric_dice_hd95_and_assd() -> None:
    # A cube of side n voxels, the prediction shifted by k voxels along axis 0, voxel size (sx, sy, sz) mm with
    # k * sx <= sy, sz, so every surface voxel's nearest surface of the other cube lies along axis 0:
    #   - leading face (n^2 voxels) and interior of the trailing face ((n-2)^2): k * sx away;
    #   - the side ring (4n - 4 voxels) j = 1 .. k-1 layers beyond the other cube: j * sx away;
    #   - the rest of the surface coincides with the other cube's surface: 0.
    # Both directions give the same distances, so the mean of either is the ASSD, and since far more than
    # 5 % of the surface lies k * sx away, HD95 = k * sx.
    n, k = 10, 2
    spacing = (0.8, 2.0, 2.5)
    truth = _cube((24, 24, 24), (5, 6, 7), n)
    pred = _cube((24, 24, 24), (5 + k, 6, 7), n)

    scores = segmentation_metrics(pred, truth, CLASSES, spacing)["first"]

    sx = spacing[0]
    surface_voxels = n**3 - (n - 2) ** 3
    far = n**2 + (n - 2) ** 2
    assert far / surface_voxels > 0.05
    total_distance = sum(j * sx * (4 * n - 4) for j in range(1, k)) + k * sx * far
    assert scores["dice"] == pytest.approx((n - k) / n, abs=1e-6)
    assert scores["hd95_mm"] == pytest.approx(k * sx, abs=1e-5)
    assert scores["assd_mm"] == pytest.approx(total_distance / surface_voxels, abs=1e-5)
    voxel_ml = math.prod(spacing) / 1000
    assert scores["volume_pred_ml"] == pytest.approx(n**3 * voxel_ml)
    assert scores["abs_volume_diff_ml"] == pytest.approx(0.0)


def test_volume_difference_is_in_millilitres_of_the_voxel_size() -> None:
    spacing = (1.5, 1.0, 2.0)
    truth = _cube((20, 20, 20), (4, 4, 4), 8)
    pred = _cube((20, 20, 20), (4, 4, 4), 10)

    scores = segmentation_metrics(pred, truth, CLASSES, spacing)["first"]

    voxel_ml = 1.5 * 1.0 * 2.0 / 1000
    assert scores["volume_true_ml"] == pytest.approx(8**3 * voxel_ml)
    assert scores["volume_pred_ml"] == pytest.approx(10**3 * voxel_ml)
    assert scores["abs_volume_diff_ml"] == pytest.approx((10**3 - 8**3) * voxel_ml)
    assert scores["dice"] == pytest.approx(2 * 8**3 / (8**3 + 10**3), abs=1e-6)


def test_identical_maps_score_perfectly() -> None:
    labels = _cube((16, 16, 16), (2, 3, 4), 6) + _cube((16, 16, 16), (9, 9, 9), 4, cls=2)

    scores = segmentation_metrics(labels, labels.copy(), CLASSES, (1.0, 1.0, 1.0))

    for cls in ("first", "second"):
        assert scores[cls]["dice"] == pytest.approx(1.0)
        assert scores[cls]["hd95_mm"] == 0.0
        assert scores[cls]["assd_mm"] == 0.0
        assert scores[cls]["abs_volume_diff_ml"] == 0.0


def test_empty_classes_have_the_documented_values() -> None:
    truth = _cube((12, 12, 12), (2, 2, 2), 5)  # class "first" present, "second" absent in both
    pred = np.zeros_like(truth)  # empty prediction

    scores = segmentation_metrics(pred, truth, CLASSES, (1.0, 1.0, 1.0))

    assert set(scores) == {"first", "second"}
    assert all(set(per_class) == set(METRICS) for per_class in scores.values())
    assert scores["first"]["dice"] == 0.0
    assert math.isnan(scores["first"]["hd95_mm"]) and math.isnan(scores["first"]["assd_mm"])
    assert scores["first"]["volume_pred_ml"] == 0.0
    assert scores["first"]["abs_volume_diff_ml"] == pytest.approx(5**3 / 1000)
    assert scores["second"] == {
        "dice": 1.0,
        "hd95_mm": 0.0,
        "assd_mm": 0.0,
        "volume_pred_ml": 0.0,
        "volume_true_ml": 0.0,
        "abs_volume_diff_ml": 0.0,
    }


def test_prediction_with_a_class_missing_from_truth_is_dice_zero() -> None:
    truth = np.zeros((12, 12, 12), dtype=np.uint8)
    pred = _cube((12, 12, 12), (1, 1, 1), 3, cls=2)

    scores = segmentation_metrics(pred, truth, CLASSES, (1.0, 1.0, 1.0))["second"]

    assert scores["dice"] == 0.0
    assert math.isnan(scores["hd95_mm"])


def test_class_index_outside_the_protocol_is_refused() -> None:
    labels = np.zeros((8, 8, 8), dtype=np.uint8)
    labels[0, 0, 0] = len(CLASSES)
    with pytest.raises(ValueError, match="truth must hold integer class indices 0..2"):
        segmentation_metrics(np.zeros_like(labels), labels, CLASSES, (1.0, 1.0, 1.0))


def test_summary_skips_nan_and_counts_the_values_used() -> None:
    per_subject = [
        {"first": {"dice": 0.5, "hd95_mm": 2.0}},
        {"first": {"dice": 0.0, "hd95_mm": math.nan}},
        {"first": {"dice": 0.7, "hd95_mm": 4.0}},
    ]

    summary = summarize(per_subject)["first"]

    assert summary["dice"]["n"] == 3
    assert summary["dice"]["mean"] == pytest.approx((0.5 + 0.0 + 0.7) / 3)
    assert summary["dice"]["median"] == pytest.approx(0.5)
    assert summary["hd95_mm"]["n"] == 2
    assert summary["hd95_mm"]["mean"] == pytest.approx(3.0)
    assert summary["hd95_mm"]["sd"] == pytest.approx(math.sqrt(((2 - 3) ** 2 + (4 - 3) ** 2) / 1))


def test_summary_of_only_undefined_values_is_nan_with_count_zero() -> None:
    summary = summarize([{"first": {"hd95_mm": math.nan}}])["first"]["hd95_mm"]

    assert summary["n"] == 0
    assert all(math.isnan(summary[stat]) for stat in ("mean", "sd", "median"))


def test_dice_and_surface_distances_are_monais() -> None:
    # Dice from the voxel counts, and one computation of the surface distances, give what MONAI's Dice,
    # 95 % Hausdorff and symmetric average surface distance functions give each on their own.
    import torch
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
    from scipy import ndimage

    rng = np.random.default_rng(3)
    spacing = (1.0, 1.5, 3.0)
    blobs = [ndimage.gaussian_filter(rng.standard_normal((24, 20, 16)), 2.0) > 0.05 for _ in range(2)]
    pred, truth = (torch.from_numpy(b)[None, None] for b in blobs)
    ours = segmentation_metrics(blobs[0].astype(np.uint8), blobs[1].astype(np.uint8), ["bg", "fg"], spacing)
    hd95 = compute_hausdorff_distance(pred, truth, include_background=True, percentile=95, spacing=spacing)
    assd = compute_average_surface_distance(
        pred, truth, include_background=True, symmetric=True, spacing=spacing
    )
    dice = compute_dice(pred.float(), truth.float(), include_background=True, ignore_empty=False)
    assert 0.05 < ours["fg"]["dice"] < 0.95  # overlapping, not equal: the comparison means something
    assert ours["fg"]["dice"] == pytest.approx(float(dice), rel=1e-6)
    assert ours["fg"]["hd95_mm"] == pytest.approx(float(hd95), rel=1e-6)
    assert ours["fg"]["assd_mm"] == pytest.approx(float(assd), rel=1e-6)
    assert ours["fg"]["hd95_mm"] > 0 and ours["fg"]["assd_mm"] > 0
