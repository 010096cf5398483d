"""Preprocessing onto the plan's grid and back: exact where it can be, close where it resamples."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from client.preprocessing import (
    NativeTransform,
    PreprocessingPlan,
    labels_to_native,
    native_image,
    preprocess_subject,
    preprocess_volume,
    probabilities_to_native,
)
from models.errors import NeurofedError
from models.label_protocols import TISSUE

SMALL_FOV_MM = (48.0, 56.0, 52.0)  # the default phantom volume: the head fits with a margin


def native_classes(subject) -> np.ndarray:
    return TISSUE.map_freesurfer(np.asarray(nib.load(subject.label).dataobj))


def dice(a: np.ndarray, b: np.ndarray, cls: int) -> float:
    return 2.0 * np.sum((a == cls) & (b == cls)) / (np.sum(a == cls) + np.sum(b == cls))


def nearest_round_trip(classes: np.ndarray, transform: NativeTransform) -> np.ndarray:
    """Nearest-neighbour resampling to the grid and back, through the same affines: the baseline."""

    def sample(array: np.ndarray, out_shape, out_affine, in_affine) -> np.ndarray:
        idx = np.indices(out_shape).reshape(3, -1)
        coords = (np.linalg.inv(in_affine) @ out_affine @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]
        return ndimage.map_coordinates(array, coords, order=0, mode="constant").reshape(out_shape)

    on_grid = sample(classes, transform.grid_shape, transform.grid_affine, transform.native_affine)
    return sample(on_grid, transform.native_shape, transform.native_affine, transform.grid_affine)


# --- the plan ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [1.0, 2.0])
def test_default_grid_covers_the_field_of_view_exactly(spacing):
    plan = PreprocessingPlan(target_spacing_mm=(spacing,) * 3)
    assert np.allclose(np.multiply(plan.grid_shape, spacing), plan.field_of_view_mm, atol=0)


def test_plan_json_round_trip_keeps_plan_and_fingerprint():
    plan = PreprocessingPlan(
        input_contrasts=("T1w", "FLAIR"), target_spacing_mm=(1.5, 1.5, 3.0), clip_percentiles=(1, 99)
    )
    again = PreprocessingPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert again.fingerprint() == plan.fingerprint()


ALTERNATIVES = {
    "input_contrasts": ("T2w",),
    "target_spacing_mm": (2.0, 2.0, 1.0),
    "field_of_view_mm": (192.0, 224.0, 224.0),
    "clip_percentiles": (0.5, 99.0),
    "normalization": "none",
    "image_interpolation": 3,
    "crop_neck_first": False,
}


def test_fingerprint_changes_with_every_field():
    assert set(ALTERNATIVES) == {f.name for f in dataclasses.fields(PreprocessingPlan)}
    base = PreprocessingPlan()
    fingerprints = {base.fingerprint()}
    for name, value in ALTERNATIVES.items():
        fingerprints.add(dataclasses.replace(base, **{name: value}).fingerprint())
    assert len(fingerprints) == len(ALTERNATIVES) + 1


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"target_spacing_mm": (2.0, -2.0, 2.0)}, "target_spacing_mm"),
        ({"target_spacing_mm": (2.0, 2.0)}, "target_spacing_mm"),
        ({"field_of_view_mm": (0.0, 224.0, 192.0)}, "field_of_view_mm"),
        ({"field_of_view_mm": (1.0, 224.0, 192.0)}, "field_of_view_mm"),
        ({"clip_percentiles": (99.5, 0.5)}, "clip_percentiles"),
        ({"normalization": "minmax"}, "normalization"),
        ({"image_interpolation": 7}, "image_interpolation"),
        ({"input_contrasts": ()}, "input_contrasts"),
        ({"input_contrasts": ("T1w", "T1w")}, "input_contrasts"),
    ],
)
def test_plan_rejects_invalid_fields_naming_them(change, named):
    with pytest.raises(NeurofedError, match=named):
        PreprocessingPlan(**change)


def test_plan_from_dict_rejects_unknown_fields():
    with pytest.raises(NeurofedError, match="voxel_size"):
        PreprocessingPlan.from_dict({**PreprocessingPlan().to_dict(), "voxel_size": 2})


# --- geometry -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axcodes", ["RAS", "LIA", "LAS", "PSR"])
def test_one_mm_round_trip_is_exact_in_any_orientation(tmp_path, head_phantoms, axcodes):
    subject = head_phantoms.write_subject(tmp_path, "sub-01", head_phantoms.labels(), axcodes=axcodes)
    plan = PreprocessingPlan(target_spacing_mm=(1.0, 1.0, 1.0), field_of_view_mm=SMALL_FOV_MM)

    pre = preprocess_subject(subject, plan, TISSUE)

    assert pre.image.shape == (1, *plan.grid_shape) and pre.image.dtype == np.float32
    assert pre.label.shape == plan.grid_shape and pre.label.dtype == np.uint8
    assert nib.aff2axcodes(pre.transform.grid_affine) == ("R", "A", "S")
    back = labels_to_native(pre.label, pre.transform)
    original = native_classes(subject)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, original)

    written = native_image(back, pre.transform)
    source = nib.load(subject.label)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine)


def test_grid_spacing_and_world_position_follow_the_plan(tmp_path, head_phantoms):
    subject = head_phantoms.write_subject(tmp_path, "sub-01", head_phantoms.labels(), axcodes="LIA")
    plan = PreprocessingPlan(target_spacing_mm=(2.0, 2.0, 2.0), field_of_view_mm=SMALL_FOV_MM)
    pre = preprocess_subject(subject, plan, TISSUE)
    grid, native = pre.transform.grid_affine, pre.transform.native_affine
    np.testing.assert_allclose(np.linalg.norm(grid[:3, :3], axis=0), plan.target_spacing_mm)
    # Every class keeps its world centre of mass to within a fraction of a grid voxel.
    classes = native_classes(subject)
    for cls in (1, 2, 3):
        native_centre = native @ [*ndimage.center_of_mass(classes == cls), 1.0]
        grid_centre = grid @ [*ndimage.center_of_mass(pre.label == cls), 1.0]
        assert np.linalg.norm(native_centre - grid_centre) < 0.5


def test_two_mm_round_trip_overlaps_and_keeps_native_grid(tmp_path, head_phantoms):
    labels = head_phantoms.labels(
        shape=(64, 72, 64), head_radii=(28, 32, 28), csf_mm=5, cortex_mm=8, ventricles=False
    )
    subject = head_phantoms.write_subject(tmp_path, "sub-01", labels, axcodes="LIA")
    pre = preprocess_subject(subject, PreprocessingPlan(field_of_view_mm=(64, 72, 64)), TISSUE)

    back = labels_to_native(pre.label, pre.transform)
    original = native_classes(subject)
    assert back.shape == original.shape
    assert [dice(back, original, c) for c in (1, 2, 3)] == pytest.approx([1, 1, 1], abs=0.1)
    assert dice(back > 0, original > 0, True) > 0.95


def test_one_hot_resampling_keeps_thin_cortex_better_than_nearest_neighbour(tmp_path, head_phantoms):
    subject = head_phantoms.write_subject(tmp_path, "sub-01", head_phantoms.labels(cortex_mm=2.0))
    pre = preprocess_subject(subject, PreprocessingPlan(field_of_view_mm=SMALL_FOV_MM), TISSUE)
    original = native_classes(subject)

    ours = labels_to_native(pre.label, pre.transform)
    nearest = nearest_round_trip(original, pre.transform)
    for cls in (1, 2, 3):
        assert dice(ours, original, cls) > dice(nearest, original, cls)
    assert dice(ours, original, 2) > dice(nearest, original, 2) + 0.05


@pytest.mark.parametrize("noise", [1.0, 0.3])
def test_probabilities_to_native_matches_a_dense_argmax(tmp_path, head_phantoms, noise):
    # noise 1.0: every class reaches 1/K somewhere on most of the grid; 0.3: only inside the head, so the
    # classes', and the background's, boxes are the head's (probabilities_to_native scores only there).
    subject = head_phantoms.write_subject(tmp_path, "sub-01", head_phantoms.labels(), axcodes="LIA")
    pre = preprocess_subject(subject, PreprocessingPlan(field_of_view_mm=SMALL_FOV_MM), TISSUE)
    transform = pre.transform
    rng = np.random.default_rng(3)
    logits = noise * rng.normal(size=(4, *transform.grid_shape)) + 3.0 * np.eye(4)[pre.label].transpose(
        3, 0, 1, 2
    )
    probs = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)

    result = probabilities_to_native(probs.astype(np.float32), transform)

    # Reference: every channel densely, float64, background 1 outside the grid.
    idx = np.indices(transform.native_shape).reshape(3, -1)
    coords = (
        np.linalg.inv(transform.grid_affine)
        @ transform.native_affine
        @ np.vstack([idx, np.ones(idx.shape[1])])
    )[:3]
    dense = np.stack(
        [
            ndimage.map_coordinates(p, coords, order=1, mode="grid-constant", cval=float(c == 0))
            for c, p in enumerate(probs)
        ]
    )
    expected = dense.argmax(axis=0).reshape(transform.native_shape)
    assert result.shape == transform.native_shape
    assert np.mean(result != expected) < 1e-4
    assert set(np.unique(result)) == {0, 1, 2, 3}


def test_classes_resampled_at_once_give_what_one_at_a_time_gives(tmp_path, head_phantoms, monkeypatch):
    from client.preprocessing import labels

    subject = head_phantoms.write_subject(tmp_path, "sub-01", head_phantoms.labels(), axcodes="LIA")
    pre = preprocess_subject(subject, PreprocessingPlan(field_of_view_mm=SMALL_FOV_MM), TISSUE)
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, *pre.transform.grid_shape)) + 3.0 * np.eye(4)[pre.label].transpose(
        3, 0, 1, 2
    )
    probs = (np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)).astype(np.float32)
    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(labels, "RESAMPLING_THREADS", threads)
        results[threads] = (
            probabilities_to_native(probs, pre.transform),
            labels_to_native(pre.label, pre.transform),
        )
    for one, several in zip(results[1], results[3], strict=True):
        np.testing.assert_array_equal(one, several)


def test_probabilities_of_background_only_give_background_on_the_native_grid(tmp_path, head_phantoms):
    subject = head_phantoms.write_subject(tmp_path, "sub-01", head_phantoms.labels(), axcodes="LIA")
    pre = preprocess_subject(subject, PreprocessingPlan(field_of_view_mm=SMALL_FOV_MM), TISSUE)
    background = np.zeros((4, *pre.transform.grid_shape), np.float32)
    background[0] = 0.97
    background[1:] = 0.01
    result = probabilities_to_native(background, pre.transform)
    assert result.shape == pre.transform.native_shape and not result.any()


def test_one_hot_probabilities_give_the_same_labels(tmp_path, head_phantoms):
    subject = head_phantoms.write_subject(tmp_path, "sub-01", head_phantoms.labels(), axcodes="PSR")
    pre = preprocess_subject(subject, PreprocessingPlan(field_of_view_mm=SMALL_FOV_MM), TISSUE)
    one_hot = np.eye(4, dtype=np.float32)[pre.label].transpose(3, 0, 1, 2)
    np.testing.assert_array_equal(
        probabilities_to_native(one_hot, pre.transform), labels_to_native(pre.label, pre.transform)
    )


def test_transform_json_round_trip_maps_identically(tmp_path, head_phantoms):
    subject = head_phantoms.write_subject(tmp_path, "sub-01", head_phantoms.labels(), axcodes="LAS")
    pre = preprocess_subject(subject, PreprocessingPlan(field_of_view_mm=SMALL_FOV_MM), TISSUE)
    again = NativeTransform.from_dict(json.loads(json.dumps(pre.transform.to_dict())))
    np.testing.assert_array_equal(
        labels_to_native(pre.label, again), labels_to_native(pre.label, pre.transform)
    )


# --- cropping and intensities -----------------------------------------------------------------------------


def grid_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    points = np.argwhere(mask)
    return points.min(axis=0), points.max(axis=0)


def test_crop_centres_an_off_centre_head(tmp_path, head_phantoms):
    labels = head_phantoms.labels(shape=(80, 88, 84), centre_shift=(-12.0, 9.0, 14.0))
    subject = head_phantoms.write_subject(tmp_path, "sub-01", labels, axcodes="LIA")
    plan = PreprocessingPlan(target_spacing_mm=(1.0, 1.0, 1.0), field_of_view_mm=(56.0, 64.0, 60.0))
    pre = preprocess_subject(subject, plan, TISSUE)

    head_on_grid = pre.image[0] > pre.image[0].min() + 1.0  # air is the clipped minimum
    lo, hi = grid_box(head_on_grid)
    assert np.all(np.abs((lo + hi) / 2 - (np.asarray(plan.grid_shape) - 1) / 2) <= 1.0)
    # The whole head is inside, so mapping back loses nothing.
    np.testing.assert_array_equal(labels_to_native(pre.label, pre.transform), native_classes(subject))


def test_head_taller_than_the_field_of_view_loses_the_neck_not_the_vertex(tmp_path, head_phantoms):
    labels = head_phantoms.labels(shape=(48, 56, 72), centre_shift=(0.0, 0.0, 8.0), neck=True)
    subject = head_phantoms.write_subject(tmp_path, "sub-01", labels, axcodes="LIA")
    plan = PreprocessingPlan(target_spacing_mm=(1.0, 1.0, 1.0), field_of_view_mm=(48.0, 56.0, 52.0))
    pre = preprocess_subject(subject, plan, TISSUE)

    head_on_grid = pre.image[0] > pre.image[0].min() + 1.0
    lo, hi = grid_box(head_on_grid)
    assert lo[2] == 0  # the neck runs out of the bottom of the grid ...
    assert hi[2] == plan.grid_shape[2] - 1  # ... and the vertex is in the top slice:
    stored = nib.load(subject.label)
    head_voxels = np.argwhere(np.asarray(stored.dataobj) > 0)
    vertex_z = nib.affines.apply_affine(stored.affine, head_voxels)[:, 2].max()
    top_z = nib.affines.apply_affine(pre.transform.grid_affine, [0, 0, plan.grid_shape[2] - 1])[2]
    assert top_z == pytest.approx(vertex_z)
    # All brain classes lie above the neck, so they all survive.
    np.testing.assert_array_equal(labels_to_native(pre.label, pre.transform), native_classes(subject))


def test_zscore_inside_the_brain_mask(tmp_path, head_phantoms):
    labels = head_phantoms.labels(ventricles=False)
    subject = head_phantoms.write_subject(tmp_path, "sub-01", labels, with_mask=True)
    plan = PreprocessingPlan(target_spacing_mm=(1.0, 1.0, 1.0), field_of_view_mm=SMALL_FOV_MM)
    pre = preprocess_subject(subject, plan, TISSUE)
    # At 1 mm the grid is a voxel copy, and the phantom's brain mask is exactly grey + white matter.
    brain = (pre.label == 2) | (pre.label == 3)
    inside = pre.image[0][brain]
    assert abs(float(inside.mean())) < 1e-3
    assert float(inside.std()) == pytest.approx(1.0, abs=1e-3)


def test_zscore_inside_the_head_without_a_mask(tmp_path, head_phantoms):
    labels = head_phantoms.labels()
    image = head_phantoms.t1(labels)
    plan = PreprocessingPlan(target_spacing_mm=(1.0, 1.0, 1.0), field_of_view_mm=SMALL_FOV_MM)
    grid, transform = preprocess_volume([nib.Nifti1Image(image, np.eye(4))], plan)
    assert grid.shape == (1, *plan.grid_shape)
    assert transform.native_shape == image.shape
    head = np.asarray(labels > 0)  # phantom and grid coincide: same 1 mm voxels, head centred
    inside = grid[0][head]
    assert abs(float(inside.mean())) < 0.05
    assert float(inside.std()) == pytest.approx(1.0, abs=0.05)
    assert float(grid[0][~head].mean()) < -1.0  # air


def test_clipping_bounds_outliers(tmp_path, head_phantoms):
    labels = head_phantoms.labels()
    image = head_phantoms.t1(labels)
    image[24, 28, 26] = 1000.0  # one hot voxel inside the brain
    plan = PreprocessingPlan(target_spacing_mm=(1.0, 1.0, 1.0), field_of_view_mm=SMALL_FOV_MM)
    grid, _ = preprocess_volume([nib.Nifti1Image(image, np.eye(4))], plan)
    assert float(grid.max()) < 5.0


def test_second_contrast_is_resampled_through_world_coordinates(tmp_path, head_phantoms):
    labels = head_phantoms.labels()
    image = head_phantoms.t1(labels)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    # The same image stored in another voxel order: after preprocessing both channels must agree.
    other, other_affine = head_phantoms.reorient(image, affine, "PSR")
    plan = PreprocessingPlan(input_contrasts=("T1w", "T2w"), field_of_view_mm=SMALL_FOV_MM)
    grid, _ = preprocess_volume([nib.Nifti1Image(image, affine), nib.Nifti1Image(other, other_affine)], plan)
    assert grid.shape == (2, *plan.grid_shape)
    np.testing.assert_allclose(grid[0], grid[1], atol=1e-4)


# --- errors -------------------------------------------------------------------------------------------------


def test_foreign_label_values_are_an_error_naming_the_file(tmp_path, head_phantoms):
    labels = head_phantoms.labels()
    labels[20, 20, 20] = 1000  # not a FreeSurfer label the tissue protocol accepts
    subject = head_phantoms.write_subject(tmp_path, "sub-07", labels)
    with pytest.raises(NeurofedError, match=r"sub-07_dseg\.nii\.gz.*1000"):
        preprocess_subject(subject, PreprocessingPlan(field_of_view_mm=SMALL_FOV_MM), TISSUE)


def test_missing_contrast_is_an_error_naming_subject_and_contrast(tmp_path, head_phantoms):
    subject = head_phantoms.write_subject(tmp_path, "sub-07", head_phantoms.labels())
    plan = PreprocessingPlan(input_contrasts=("T1w", "FLAIR"), field_of_view_mm=SMALL_FOV_MM)
    with pytest.raises(NeurofedError, match=r"sub-07.*FLAIR"):
        preprocess_subject(subject, plan, TISSUE)


def test_blank_image_is_an_error():
    plan = PreprocessingPlan(field_of_view_mm=SMALL_FOV_MM)
    with pytest.raises(NeurofedError, match="no head|constant"):
        preprocess_volume([nib.Nifti1Image(np.zeros((40, 40, 40), np.float32), np.eye(4))], plan)


# --- real anatomy -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["training_seg_01.nii.gz", "training_seg_03.nii.gz"])
def test_real_label_maps_survive_two_mm(tmp_path, label_maps_dir, head_phantoms, name):
    """Whole heads at 1 mm (01 includes the neck, 03 does not) through the default 2 mm plan and back.

    A hard 2 mm label map cannot hold 1 mm detail: even the ideal partial-volume fractions at 2 mm,
    upsampled linearly, give a tissue-class Dice of only about 0.85-0.95 on these maps (thin extra-cerebral
    CSF and cortex). The brain as a whole must survive; each class must stay close.
    """
    label_image = nib.load(label_maps_dir / name)
    fs_labels = np.asarray(label_image.dataobj).astype(np.int16)
    image = nib.Nifti1Image(head_phantoms.t1(fs_labels), label_image.affine)
    label_path = tmp_path / "label.nii.gz"
    image_path = tmp_path / "t1.nii"
    nib.save(image, image_path)
    nib.save(label_image, label_path)
    from client.subjects import SubjectFiles

    subject = SubjectFiles("sub-01", {"T1w": image_path}, label=label_path)
    pre = preprocess_subject(subject, PreprocessingPlan(), TISSUE)
    back = labels_to_native(pre.label, pre.transform)

    original = TISSUE.map_freesurfer(fs_labels)
    assert back.shape == original.shape
    assert dice(back > 0, original > 0, True) > 0.95
    for cls in (1, 2, 3):
        assert dice(back, original, cls) > 0.78
    written = native_image(back, pre.transform)
    np.testing.assert_allclose(written.affine, label_image.affine)
