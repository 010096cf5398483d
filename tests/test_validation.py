"""validate_subject: one Problem per defect, naming the file and the reason; never raises, never writes."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client.subjects import SubjectFiles
from client.validation import (
    AFFINE_TOLERANCE_LINEAR,
    AFFINE_TOLERANCE_MM,
    MAX_VOXEL_MM,
    MIN_VOXEL_MM,
    VolumeError,
    load_checked_volume,
    validate_subject,
)
from models.label_protocols import ASEG, TISSUE

SHAPE = (16, 16, 16)
AFFINE = np.array([[-1.0, 0, 0, 8], [0, 0, 1, -8], [0, -1, 0, 8], [0, 0, 0, 1]])  # LIA, 1 mm


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if abs(np.linalg.det(affine[:3, :3])) > 1e-9:
        image = nib.Nifti1Image(data, affine)
    else:  # a singular affine has no qform (quaternion) form; broken headers carry it as sform only
        image = nib.Nifti1Image(data, None)
        image.set_sform(affine, code=2)
    nib.save(image, path)
    return path


def good_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(100.0, 20.0, SHAPE).astype(np.float32)


def good_label() -> np.ndarray:
    """FreeSurfer values: air, CSF (24), cortex (3), white matter (2), scalp (507)."""
    label = np.zeros(SHAPE, dtype=np.int16)
    label[2:14, 2:14, 2:14] = 24
    label[3:13, 3:13, 3:13] = 3
    label[5:11, 5:11, 5:11] = 2
    label[0, :, :] = 507
    return label


def make_subject(tmp_path: Path, image=None, label=None, mask=None, **extra_images) -> SubjectFiles:
    images = {"T1w": write_nifti(tmp_path / "sub-01_T1w.nii.gz", good_image() if image is None else image)}
    for contrast, data in extra_images.items():
        images[contrast] = write_nifti(tmp_path / f"sub-01_{contrast}.nii.gz", data)
    label_path = write_nifti(tmp_path / "sub-01_dseg.nii.gz", good_label() if label is None else label)
    mask_path = write_nifti(tmp_path / "sub-01_mask.nii.gz", mask) if mask is not None else None
    return SubjectFiles("sub-01", images, label=label_path, mask=mask_path)


def only_problem(check, path: Path) -> str:
    """The single problem of ``check``; it must name ``path``."""
    assert len(check.problems) == 1, [str(p) for p in check.problems]
    problem = check.problems[0]
    assert problem.path == path
    assert path.name in str(problem)
    return problem.reason


def test_good_subject_is_usable(tmp_path):
    mask = (good_label() > 0).astype(np.uint8)
    check = validate_subject(make_subject(tmp_path, mask=mask), TISSUE)
    assert check.usable, [str(p) for p in check.problems]
    assert check.subject_id == "sub-01"
    assert check.warnings == []


def test_truncated_gzip_is_reported_not_raised(tmp_path):
    subject = make_subject(tmp_path)
    raw = subject.images["T1w"].read_bytes()
    subject.images["T1w"].write_bytes(raw[: len(raw) // 2])
    reason = only_problem(validate_subject(subject, TISSUE), subject.images["T1w"])
    assert "truncated or corrupt" in reason


def test_truncated_uncompressed_nifti(tmp_path):
    path = write_nifti(tmp_path / "sub-01_T1w.nii", good_image())
    path.write_bytes(path.read_bytes()[:1000])
    subject = SubjectFiles("sub-01", {"T1w": path}, label=None)
    check = validate_subject(subject, TISSUE, require_label=False)
    assert "truncated or corrupt" in only_problem(check, path)


def test_a_file_cut_short_before_its_header_ends_is_called_truncated(tmp_path):
    path = write_nifti(tmp_path / "sub-01_T1w.nii", good_image())
    path.write_bytes(path.read_bytes()[:200])
    subject = SubjectFiles("sub-01", {"T1w": path}, label=None)
    reason = only_problem(validate_subject(subject, TISSUE, require_label=False), path)
    assert "truncated: it holds 200 bytes" in reason and "copy it again" in reason
    assert "convert" not in reason


def test_non_nifti_file_with_nifti_name(tmp_path):
    subject = make_subject(tmp_path)
    subject.label.write_bytes(gzip.compress(b"patient,age\n01,45\n" * 50))
    reason = only_problem(validate_subject(subject, TISSUE), subject.label)
    assert "not a NIfTI file" in reason


def test_plain_text_with_gz_name(tmp_path):
    subject = make_subject(tmp_path)
    subject.images["T1w"].write_text("this is not an image\n")
    reason = only_problem(validate_subject(subject, TISSUE), subject.images["T1w"])
    assert "not a NIfTI file" in reason


def test_4d_with_several_volumes_is_rejected(tmp_path):
    image = np.stack([good_image()] * 3, axis=-1)
    subject = make_subject(tmp_path, image=image)
    reason = only_problem(validate_subject(subject, TISSUE), subject.images["T1w"])
    assert "3 volumes" in reason and str(image.shape) in reason


def test_4d_with_one_volume_is_accepted_and_squeezed(tmp_path):
    subject = make_subject(tmp_path, image=good_image()[..., None])
    assert validate_subject(subject, TISSUE).usable
    _, data = load_checked_volume(subject.images["T1w"])
    assert data.shape == SHAPE


def test_2d_image_is_not_a_volume(tmp_path):
    subject = make_subject(tmp_path, image=good_image()[:, :, :1])
    assert "not a 3D volume" in only_problem(validate_subject(subject, TISSUE), subject.images["T1w"])


def test_shape_mismatch_names_label_and_image(tmp_path):
    subject = make_subject(tmp_path, label=good_label()[:, :, :12])
    reason = only_problem(validate_subject(subject, TISSUE), subject.label)
    assert "shape (16, 16, 12)" in reason and "sub-01_T1w.nii.gz" in reason
    assert "nearest-neighbour" in reason


def test_shape_mismatch_between_contrasts_is_a_warning_when_not_used(tmp_path):
    subject = make_subject(tmp_path, FLAIR=good_image()[:12])
    check = validate_subject(subject, TISSUE, contrast="T1w")
    assert check.usable
    assert any("sub-01_FLAIR.nii.gz" in w and "shape" in w for w in check.warnings)
    # Reading FLAIR instead makes the same mismatch (now with the T1w) a problem of the label too.
    check = validate_subject(subject, TISSUE, contrast="FLAIR")
    assert not check.usable
    assert any(p.path == subject.label and "shape" in p.reason for p in check.problems)


@pytest.mark.parametrize(
    ("translation_mm", "expect_problem"),
    [(0.5 * AFFINE_TOLERANCE_MM, False), (2 * AFFINE_TOLERANCE_MM, True), (1.0, True)],
)
def test_affine_translation_tolerance(tmp_path, translation_mm, expect_problem):
    shifted = AFFINE.copy()
    shifted[1, 3] += translation_mm
    subject = make_subject(tmp_path)
    write_nifti(subject.label, good_label(), shifted)
    check = validate_subject(subject, TISSUE)
    if expect_problem:
        reason = only_problem(check, subject.label)
        assert "affine" in reason and f"{AFFINE_TOLERANCE_MM:g} mm" in reason
    else:
        assert check.usable, [str(p) for p in check.problems]


def test_affine_rotation_mismatch_same_shape(tmp_path):
    flipped = AFFINE.copy()
    flipped[0, 0] = 1.0  # same shape, mirrored left-right: the classic RAS/LAS mix-up
    subject = make_subject(tmp_path)
    write_nifti(subject.label, good_label(), flipped)
    reason = only_problem(validate_subject(subject, TISSUE), subject.label)
    assert "affine" in reason and f"{AFFINE_TOLERANCE_LINEAR:g}" in reason


def test_unreadable_image_does_not_blame_label_for_other_contrast(tmp_path):
    """With the T1w unreadable, the label is not compared with an unused FLAIR on another grid."""
    subject = make_subject(tmp_path, mask=(good_label() > 0).astype(np.uint8), FLAIR=good_image()[:8])
    subject.images["T1w"].write_text("not an image")
    check = validate_subject(subject, TISSUE)
    assert [p.path for p in check.problems] == [subject.images["T1w"]]


def test_nan_voxels_are_counted(tmp_path):
    image = good_image()
    image[0, 0, :3] = np.nan
    subject = make_subject(tmp_path, image=image)
    reason = only_problem(validate_subject(subject, TISSUE), subject.images["T1w"])
    assert f"3 of {image.size} voxels are NaN" in reason


def test_inf_voxels_are_counted(tmp_path):
    image = good_image()
    image[1, 1, :2] = np.inf
    image[2, 2, 2] = -np.inf
    subject = make_subject(tmp_path, image=image)
    reason = only_problem(validate_subject(subject, TISSUE), subject.images["T1w"])
    assert f"3 of {image.size} voxels are infinite" in reason


def test_constant_image(tmp_path):
    subject = make_subject(tmp_path, image=np.full(SHAPE, 7.0, dtype=np.float32))
    reason = only_problem(validate_subject(subject, TISSUE), subject.images["T1w"])
    assert "blank" in reason and "7" in reason


def test_label_values_outside_protocol_are_listed(tmp_path):
    label = good_label()
    bad_values = [1, 99, 1000, 1001, 1002, 1003, 1004, 1005]  # 1 is a class index, not a FreeSurfer value
    for i, value in enumerate(bad_values):
        label[15, i, 0] = value
    subject = make_subject(tmp_path, label=label)
    reason = only_problem(validate_subject(subject, TISSUE), subject.label)
    assert "1, 99, 1000, 1001, 1002" in reason
    assert f"and {len(bad_values) - 5} more" in reason
    assert "'tissue'" in reason


def test_label_of_another_protocol_is_caught(tmp_path):
    # A map of tissue class indices (0-3) is not a FreeSurfer map: 1 is not a value either protocol accepts.
    label = TISSUE.map_freesurfer(good_label()).astype(np.int16)
    subject = make_subject(tmp_path, label=label)
    for protocol in (TISSUE, ASEG):
        reason = only_problem(validate_subject(subject, protocol), subject.label)
        assert "label values 1" in reason


def test_non_integer_labels(tmp_path):
    label = good_label().astype(np.float32)
    label[4, 4, 4] = 2.5
    label[4, 4, 5] = 23.75
    subject = make_subject(tmp_path, label=label)
    reason = only_problem(validate_subject(subject, TISSUE), subject.label)
    assert "2 voxels have non-integer label values (e.g. 2.5, 23.75)" in reason


def test_float_stored_integer_labels_are_fine(tmp_path):
    subject = make_subject(tmp_path, label=good_label().astype(np.float32))
    assert validate_subject(subject, TISSUE).usable


def test_empty_label(tmp_path):
    label = np.zeros(SHAPE, dtype=np.int16)
    label[0] = 507  # only non-brain head tissue: no tissue class at all
    subject = make_subject(tmp_path, label=label)
    reason = only_problem(validate_subject(subject, TISSUE), subject.label)
    assert "empty" in reason and "grey_matter" in reason


@pytest.mark.parametrize("voxel_mm", [MIN_VOXEL_MM / 2, MAX_VOXEL_MM * 1.5, 0.0])
def test_implausible_voxel_size(tmp_path, voxel_mm):
    affine = np.diag([1.0, 1.0, voxel_mm, 1.0])
    subject = make_subject(tmp_path)
    write_nifti(subject.images["T1w"], good_image(), affine)
    write_nifti(subject.label, good_label(), affine)
    check = validate_subject(subject, TISSUE)
    for path in (subject.images["T1w"], subject.label):
        reasons = [p.reason for p in check.problems if p.path == path]
        assert len(reasons) == 1 and "implausible voxel size" in reasons[0], reasons


def test_non_invertible_affine(tmp_path):
    affine = np.array([[1.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    affine[:3, 1] = affine[:3, 0]  # two voxel axes point the same way
    subject = make_subject(tmp_path)
    write_nifti(subject.images["T1w"], good_image(), affine)
    check = validate_subject(subject, TISSUE)
    assert any(p.path == subject.images["T1w"] and "not invertible" in p.reason for p in check.problems)


def test_missing_label_is_a_problem_only_when_required(tmp_path):
    subject = make_subject(tmp_path)
    unlabelled = SubjectFiles("sub-01", subject.images, label=None)
    check = validate_subject(unlabelled, TISSUE)
    assert len(check.problems) == 1
    assert check.problems[0].path is None
    assert "no label map" in check.problems[0].reason and "sub-01" in check.problems[0].reason
    assert validate_subject(unlabelled, TISSUE, require_label=False).usable


def test_missing_contrast_names_what_the_subject_has(tmp_path):
    subject = make_subject(tmp_path)
    flair_only = SubjectFiles("sub-01", {"FLAIR": subject.images["T1w"]}, label=subject.label)
    check = validate_subject(flair_only, TISSUE, contrast="T1w")
    reasons = [p.reason for p in check.problems]
    assert len(reasons) == 1 and "no T1w image" in reasons[0] and "FLAIR (sub-01_T1w.nii.gz)" in reasons[0]


def test_mask_not_binary(tmp_path):
    mask = (good_label() > 0).astype(np.uint8) * 255
    subject = make_subject(tmp_path, mask=mask)
    reason = only_problem(validate_subject(subject, TISSUE), subject.mask)
    assert "0 or 1" in reason and "255" in reason


def test_mask_empty(tmp_path):
    subject = make_subject(tmp_path, mask=np.zeros(SHAPE, dtype=np.uint8))
    assert "empty" in only_problem(validate_subject(subject, TISSUE), subject.mask)


def test_mask_on_another_grid(tmp_path):
    subject = make_subject(tmp_path, mask=np.ones((16, 16, 8), dtype=np.uint8))
    assert "shape" in only_problem(validate_subject(subject, TISSUE), subject.mask)


def test_anisotropic_voxels_warn_but_do_not_block(tmp_path):
    affine = np.diag([1.0, 1.0, 5.0, 1.0])
    subject = make_subject(tmp_path)
    write_nifti(subject.images["T1w"], good_image(), affine)
    write_nifti(subject.label, good_label(), affine)
    check = validate_subject(subject, TISSUE)
    assert check.usable
    (warning,) = check.warnings
    assert "sub-01_T1w.nii.gz" in warning and "anisotropic" in warning and "5.0:1" in warning


def test_every_defect_of_a_subject_is_reported(tmp_path):
    """A broken image does not hide a broken label or mask: each file gets its own problem."""
    subject = make_subject(tmp_path, mask=np.zeros(SHAPE, dtype=np.uint8))
    subject.images["T1w"].write_text("not an image")
    label = good_label().astype(np.float32)
    label[0, 0, 0] = np.nan
    write_nifti(subject.label, label)
    check = validate_subject(subject, TISSUE)
    assert {p.path for p in check.problems} == {subject.images["T1w"], subject.label, subject.mask}


def test_validation_leaves_files_untouched(tmp_path):
    subject = make_subject(tmp_path, mask=(good_label() > 0).astype(np.uint8))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in subject.all_files()}
    validate_subject(subject, TISSUE)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in subject.all_files()} == before


def test_load_checked_volume_raises_with_file_and_reason(tmp_path):
    path = write_nifti(tmp_path / "scan.nii.gz", np.stack([good_image()] * 2, axis=-1))
    with pytest.raises(VolumeError) as info:
        load_checked_volume(path)
    assert info.value.path == path
    assert str(path) in str(info.value) and "2 volumes" in str(info.value)


def test_real_label_map_passes(tmp_path, label_maps_dir):
    """A real whole-head FreeSurfer map (256^3, LIA, float32 on disk) fits both protocols."""
    label_path = label_maps_dir / "training_seg_01.nii.gz"
    label_image = nib.load(label_path)
    image = np.zeros(label_image.shape, dtype=np.float32)
    image[::2] = 1.0  # any non-constant image on the label's grid
    image_path = tmp_path / "sub-01_T1w.nii"
    nib.save(nib.Nifti1Image(image, label_image.affine), image_path)
    subject = SubjectFiles("sub-01", {"T1w": image_path}, label=label_path)
    for protocol in (TISSUE, ASEG):
        check = validate_subject(subject, protocol)
        assert check.usable, [str(p) for p in check.problems]
