"""Label protocols map FreeSurfer values to the classes a network predicts."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from models.label_protocols import ASEG, PROTOCOLS, TISSUE, LabelProtocol, get_protocol

# The tissue protocol as written in ../shared/data/README.md (MRBrainS-style tissue classes).
README_TISSUE = {
    1: [4, 5, 14, 15, 24, 43, 44, 72],
    2: [3, 8, 10, 11, 12, 13, 17, 18, 26, 42, 47, 49, 50, 51, 52, 53, 54, 58],
    3: [2, 7, 16, 28, 41, 46, 60, 85],
}


def test_tissue_protocol_matches_the_documented_table() -> None:
    for cls, values in README_TISSUE.items():
        assert TISSUE.map_freesurfer(np.array(values)).tolist() == [cls] * len(values)
    assert TISSUE.class_names == ("background", "csf", "grey_matter", "white_matter")


@pytest.mark.parametrize("protocol", [TISSUE, ASEG], ids=lambda p: p.name)
def test_non_brain_tissue_air_and_small_structures_are_background(protocol: LabelProtocol) -> None:
    values = np.array([0, 500, 507, 511, 515, 530, 599, 25, 30, 57, 62, 136, 137, 163, 164])
    assert protocol.map_freesurfer(values).tolist() == [0] * len(values)


def test_aseg_has_one_class_per_structure_and_hemisphere() -> None:
    assert ASEG.num_classes == 33
    left = ASEG.map_freesurfer(np.array([2, 3, 17]))
    right = ASEG.map_freesurfer(np.array([41, 42, 53]))
    assert len(set(left.tolist()) | set(right.tolist())) == 6
    assert ASEG.class_names[int(ASEG.map_freesurfer(np.array([17]))[0])] == "left_hippocampus"
    assert ASEG.class_names[int(ASEG.map_freesurfer(np.array([53]))[0])] == "right_hippocampus"


def test_mapping_keeps_shape_and_returns_uint8() -> None:
    labels = np.array([[[0, 2], [3, 41]], [[507, 4], [24, 42]]], dtype=np.int32)
    classes = TISSUE.map_freesurfer(labels)
    assert classes.dtype == np.uint8 and classes.shape == labels.shape
    assert classes.tolist() == [[[0, 3], [2, 3]], [[0, 1], [1, 2]]]


def test_float_label_maps_with_integer_values_are_accepted_and_fractions_refused() -> None:
    assert TISSUE.map_freesurfer(np.array([2.0, 3.0])).tolist() == [3, 2]
    with pytest.raises(ValueError, match="non-integer"):
        TISSUE.map_freesurfer(np.array([2.5]))
    with pytest.raises(ValueError, match="negative"):
        TISSUE.map_freesurfer(np.array([-1]))


def test_values_outside_the_protocol_are_reported() -> None:
    assert TISSUE.unknown_values(np.array([0, 2, 41, 507, 9999, 1000])) == [1000, 9999]
    # class indices of another protocol are not FreeSurfer labels: 1 is not a FreeSurfer structure here
    assert TISSUE.unknown_values(np.array([0, 1])) == [1]


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_protocol_round_trips_through_json_dict(name: str) -> None:
    protocol = get_protocol(name)
    assert LabelProtocol.from_dict(protocol.to_dict()) == protocol


def test_unknown_protocol_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="aseg, tissue"):
        get_protocol("mrbrains")


def test_a_label_in_two_classes_is_refused() -> None:
    with pytest.raises(ValueError, match="label 2 in classes 1 and 2"):
        LabelProtocol("bad", ("background", "a", "b"), {1: (2,), 2: (2,)})


def test_real_label_map_maps_every_brain_voxel_and_no_head_tissue(label_maps_dir) -> None:
    labels = np.asarray(nib.load(label_maps_dir / "training_seg_01.nii.gz").dataobj).astype(np.int32)
    assert TISSUE.unknown_values(np.unique(labels)) == []
    classes = TISSUE.map_freesurfer(labels)
    assert not classes[labels >= 500].any()
    brain = np.isin(labels, [v for values in README_TISSUE.values() for v in values])
    assert (classes[brain] > 0).all()
    # whole-brain tissue volume of an adult head, in litres (1 mm voxels)
    assert 1.0 < np.count_nonzero(classes) / 1e6 < 2.0
