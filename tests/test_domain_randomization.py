"""The domain-randomized generator (study/domain_randomization.py): contrast, resolution, field of view and
skull stripping follow its settings, and every generated image stays aligned with its label map."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from client.preprocessing import PreprocessingPlan
from models.label_protocols import get_protocol
from study.domain_randomization import GeneratorSettings, draw_profile, randomized_subject
from study.head_phantom import make_head_phantom

PLAN = PreprocessingPlan(target_spacing_mm=(4.0, 4.0, 4.0))
TISSUE = get_protocol("tissue")
CLEAN = GeneratorSettings(
    output_spacings_mm=(4.0,),
    output_spacing_weights=(1.0,),
    label_jitter_max=0.0,
    texture_std_max=0.0,
    bias_field_std_max=0.0,
    noise_level_max=0.0,
    gamma_log_std=0.0,
    thick_slice_probability=0.0,
    skull_strip_probability=0.0,
    crop_probability=0.0,
)
"""No noise, bias, texture, gamma, thick slices, stripping or crops: what is left is contrast and geometry."""


@pytest.fixture(scope="module")
def anatomy() -> tuple[np.ndarray, np.ndarray]:
    return make_head_phantom(np.random.default_rng(3), spacing_mm=2.0)


def _subject(anatomy, settings: GeneratorSettings, seed: int) -> tuple[np.ndarray, np.ndarray]:
    labels, affine = anatomy
    return randomized_subject(labels, affine, settings, PLAN, TISSUE, np.random.default_rng(seed))


def _class_means(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    return np.array([image[0][label == k].mean() for k in range(1, TISSUE.num_classes)])


def _nearest_mean_dice(image: np.ndarray, label: np.ndarray, reference: np.ndarray) -> float:
    """Mean foreground Dice of labelling each brain voxel with the class whose mean intensity (measured
    against ``reference``) is nearest: high only when image and labels line up voxel for voxel."""
    brain = reference > 0
    means = _class_means(image, reference)
    guess = np.zeros_like(label)
    guess[brain] = 1 + np.abs(image[0][brain][:, None] - means[None]).argmin(axis=1)
    dice = [2 * ((guess == k) & (label == k)).sum() / ((guess == k).sum() + (label == k).sum()) for k in (1, 2, 3)]
    return float(np.mean(dice))


def test_contrast_follows_the_configured_family_and_the_labels_stay_aligned(anatomy) -> None:
    t1 = _subject(anatomy, dataclasses.replace(CLEAN, contrast_families=("T1w",), contrast_weights=(1.0,)), 1)
    t2 = _subject(anatomy, dataclasses.replace(CLEAN, contrast_families=("T2w",), contrast_weights=(1.0,)), 1)
    csf, grey, white = _class_means(*t1)
    assert white > grey > csf  # T1-like
    csf, grey, white = _class_means(*t2)
    assert csf > grey > white  # T2-like
    arbitrary = dataclasses.replace(CLEAN, contrast_families=("arbitrary",), contrast_weights=(1.0,))
    orders = {tuple(np.argsort(_class_means(*_subject(anatomy, arbitrary, seed)))) for seed in range(6)}
    assert len(orders) >= 3  # arbitrary contrast: no fixed order of the tissues' intensities

    image, label = t1
    assert _nearest_mean_dice(image, label, label) > 0.7
    # The same image against its labels moved by two voxels (8 mm) scores far lower: they were aligned.
    shifted = np.roll(label, 2, axis=0)
    assert _nearest_mean_dice(image, shifted, label) < _nearest_mean_dice(image, label, label) - 0.2


def test_resolution_slices_and_field_of_view_follow_the_settings() -> None:
    settings = GeneratorSettings(
        output_spacings_mm=(3.0,),
        output_spacing_weights=(1.0,),
        thick_slice_probability=1.0,
        slice_thickness_mm=(5.0, 6.0),
        fov_margin_mm=(10.0, 12.0),
    )
    for seed in range(5):
        profile, spacing = draw_profile(settings, np.random.default_rng(seed))
        assert spacing == 3.0
        assert sorted(profile.acquisition_voxel_mm)[-1] >= 5.0  # one thick axis
        assert sorted(profile.acquisition_voxel_mm)[1] <= 3.0 * 1.3  # the others near the output spacing
        assert all(10.0 <= m <= 12.0 for pair in profile.fov_margin_mm for m in pair)


def test_skull_stripping_and_crops_are_drawn_as_configured(anatomy) -> None:
    stripped_image, stripped_label = _subject(anatomy, dataclasses.replace(CLEAN, skull_strip_probability=1.0), 5)
    whole_image, whole_label = _subject(anatomy, CLEAN, 5)
    # Stripped: everything that is not brain is the one background value (the minimum after normalisation);
    # with the head kept, the scalp and skull around the brain are not.
    outside = stripped_label == 0
    assert np.ptp(stripped_image[0][outside]) < 1e-3 * np.ptp(stripped_image)
    assert np.ptp(whole_image[0][whole_label == 0]) > 0.1 * np.ptp(whole_image)

    cropped_image, cropped_label = _subject(
        anatomy, dataclasses.replace(CLEAN, crop_probability=1.0, crop_fraction_max=0.3), 5
    )
    # The same draw, cut at one side: part of the brain is gone from both image and label.
    assert 0 < (cropped_label > 0).sum() < (whole_label > 0).sum()
    assert cropped_image.shape == whole_image.shape  # preprocessing pads back onto the plan's grid
