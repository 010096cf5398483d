"""The procedural head phantom: FreeSurfer labels, plausible anatomy, correct sides, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from models.label_protocols import TISSUE
from study.head_phantom import make_head_phantom

LEFT_RIGHT = {
    "cerebral white matter": (2, 41),
    "cerebral cortex": (3, 42),
    "lateral ventricle": (4, 43),
    "inferior lateral ventricle": (5, 44),
    "cerebellum white matter": (7, 46),
    "cerebellum cortex": (8, 47),
    "thalamus": (10, 49),
    "caudate": (11, 50),
    "putamen": (12, 51),
    "pallidum": (13, 52),
    "hippocampus": (17, 53),
}
MIDLINE = {"3rd ventricle": 14, "4th ventricle": 15, "brain-stem": 16, "CSF": 24}
HEAD = {"soft tissue": 507, "skin": 511, "skull": 515, "marrow": 516}


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    return make_head_phantom(np.random.default_rng(3), spacing_mm=1.5)


def _world_x(labels: np.ndarray, affine: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    idx = np.argwhere(np.isin(labels, values))
    return (affine[:3, :3] @ idx.T + affine[:3, 3:4])[0]


def _face_contacts(a: np.ndarray, b: np.ndarray) -> int:
    """Number of voxel faces between a voxel of mask a and a voxel of mask b."""
    n = 0
    for axis in range(3):
        x, y = np.moveaxis(a, axis, 0), np.moveaxis(b, axis, 0)
        n += int((x[1:] & y[:-1]).sum() + (x[:-1] & y[1:]).sum())
    return n


def test_phantom_contains_every_structure_and_only_freesurfer_values(phantom) -> None:
    labels, _ = phantom
    present = set(np.unique(labels).tolist())
    expected = {v for pair in LEFT_RIGHT.values() for v in pair} | set(MIDLINE.values()) | set(HEAD.values())
    assert expected <= present, f"missing labels {sorted(expected - present)}"
    assert labels.dtype == np.int16
    assert TISSUE.unknown_values(np.array(sorted(present))) == []


def test_left_structures_lie_left_of_their_right_partners_in_ras(phantom) -> None:
    labels, affine = phantom
    assert np.all(np.diag(affine)[:3] > 0), "phantom must be stored in RAS voxel order"
    midline = _world_x(labels, affine, (16,)).mean()
    for name, (left, right) in LEFT_RIGHT.items():
        x_left, x_right = _world_x(labels, affine, (left,)), _world_x(labels, affine, (right,))
        assert x_left.max() <= midline + 3.0 < x_right.min() + 6.0, name
        assert x_left.mean() < midline < x_right.mean(), name


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_brain_volume_is_adult_sized(seed: int) -> None:
    spacing = 2.0
    labels, _ = make_head_phantom(np.random.default_rng(seed), spacing_mm=spacing)
    brain = (labels > 0) & (labels < 500) & (labels != 24)
    litres = brain.sum() * spacing**3 / 1e6
    assert 1.1 <= litres <= 1.5
    classes = TISSUE.map_freesurfer(labels)
    csf, grey, white = (float((classes == k).sum()) * spacing**3 / 1e6 for k in (1, 2, 3))
    assert 0.1 < csf < 0.6 and 0.35 < grey < 0.8 and 0.35 < white < 0.85


def test_cortex_is_a_folded_ribbon_between_white_matter_and_csf(phantom) -> None:
    labels, affine = phantom
    spacing = float(affine[0, 0])
    white, cortex = np.isin(labels, (2, 41)), np.isin(labels, (3, 42))
    intracranial = (labels > 0) & (labels < 500)
    # Folding: the white/grey interface is much larger than the smooth outline of the skull's inside.
    interface = _face_contacts(white, cortex)
    assert interface / _face_contacts(intracranial, ~intracranial) > 1.5
    # A ribbon: white matter almost never touches the CSF outside the brain directly...
    assert _face_contacts(white, labels == 24) < 0.03 * _face_contacts(white, ~white)
    # ...and the cortex is a few millimetres thick (volume / interface area).
    thickness_mm = cortex.sum() * spacing / interface
    assert 1.5 < thickness_mm < 4.5


def test_head_fits_in_the_volume_except_the_neck(phantom) -> None:
    labels, _ = phantom
    faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, -1]]
    assert all(not f.any() for f in faces)
    assert labels[:, :, 0].any(), "the neck continues below the volume"


def test_same_generator_state_gives_the_same_phantom_and_another_a_different_one() -> None:
    a, affine_a = make_head_phantom(np.random.default_rng(11), spacing_mm=2.0)
    b, affine_b = make_head_phantom(np.random.default_rng(11), spacing_mm=2.0)
    c, _ = make_head_phantom(np.random.default_rng(12), spacing_mm=2.0)
    assert a.tobytes() == b.tobytes() and np.array_equal(affine_a, affine_b)
    assert a.shape == c.shape and (a != c).mean() > 0.01
