"""One subject: the image one simulated scanner acquires of one randomly deformed label map.

``synthesize_subject`` deforms the label map (study/subject_geometry.py), samples it with partial volume,
looks up per-label intensities around the scanner's tissue means, adds within-tissue texture, a smooth
bias field, slice thickness and Rician noise, and stores the result in the scanner's voxel orientation.
Every random draw comes from the subject's generator, in a fixed order.
"""

from __future__ import annotations

import functools

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from models.label_protocols import NON_BRAIN_LABEL_MIN
from study.label_maps import as_label_array
from study.scanner_profiles import LABEL_TO_GROUP, ScannerProfile, tissue_group
from study.subject_geometry import (
    ELASTIC_ORDER,
    SCANNER_DEFORMATION,
    DeformationRange,
    OutputGrid,
    cosine_basis,
    draw_deformation,
    field_of_view,
    index_coefficients,
    preimage_box,
    projections,
    separable,
    world_box,
)

EXTRA_CEREBRAL_CSF = 24
BIAS_ORDER = 2
CHUNK_POINTS = 2_000_000
"""Sampling points per chunk: bounds memory (3 float64 coordinates each) whatever the volume size."""


@functools.lru_cache(maxsize=8)
def _label_groups(max_label: int) -> tuple[str | None, ...]:
    return tuple(tissue_group(v) for v in range(max_label + 1))


def _intensity_lut(profile: ScannerProfile, rng: np.random.Generator, max_label: int) -> np.ndarray:
    """float32 ``lut[label]``: this subject's mean intensity of every label, relative units.

    Each label's mean is its tissue group's mean times a per-subject jitter; head labels without a
    group of their own (eyes, muscle, sinuses, ...) spread further around soft tissue.
    """
    jitter = rng.standard_normal(max_label + 1)
    spread = rng.standard_normal(max_label + 1)
    means = profile.tissue_means
    lut = np.zeros(max_label + 1, dtype=np.float32)
    for label, group in enumerate(_label_groups(max_label)):
        if group is None:
            continue
        value = getattr(means, group) * np.exp(profile.label_jitter * jitter[label])
        if group == "soft_tissue" and label not in LABEL_TO_GROUP:
            value *= np.exp(0.3 * spread[label])
        lut[label] = value
    return lut


def _sample(
    labels: np.ndarray, coefficients: np.ndarray, grid: OutputGrid, center: np.ndarray, lut: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Partial-volume intensity and centre label on the output grid.

    Labels are sampled (nearest neighbour) at 2x2x2 sub-voxel points per output voxel; their lookup
    intensities are averaged, so a voxel that straddles two tissues gets a mix of both.

    Returns:
        ``(intensity float32, dseg int16)``, both of ``grid.shape``, RAS axis order.
    """
    nx, ny, nz = grid.shape
    fine = [cosine_basis(grid.axis_mm(d, 2), center[d], ELASTIC_ORDER) for d in range(3)]
    coarse = [cosine_basis(grid.axis_mm(d, 1), center[d], ELASTIC_ORDER) for d in range(3)]
    intensity = np.empty(grid.shape, dtype=np.float32)
    dseg = np.empty(grid.shape, dtype=np.int16)
    step = max(1, CHUNK_POINTS // (8 * ny * nz))
    for i0 in range(0, nx, step):
        i1 = min(nx, i0 + step)
        bases = [fine[0][:, 2 * i0 : 2 * i1], fine[1], fine[2]]
        coords = np.stack([separable(coefficients[c], bases) for c in range(3)])
        sub = ndi.map_coordinates(labels, coords, order=0, mode="constant", cval=0, output=np.int16)
        values = np.take(lut, sub)
        values = values[0::2] + values[1::2]
        values = values[:, 0::2] + values[:, 1::2]
        intensity[i0:i1] = (values[:, :, 0::2] + values[:, :, 1::2]) * 0.125
        bases = [coarse[0][:, i0:i1], coarse[1], coarse[2]]
        coords = np.stack([separable(coefficients[c], bases) for c in range(3)])
        dseg[i0:i1] = ndi.map_coordinates(labels, coords, order=0, mode="constant", cval=0, output=np.int16)
    return intensity, dseg


def _smooth_texture(rng: np.random.Generator, shape: tuple[int, ...], sigma_voxels: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed white noise (float32)."""
    field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_voxels)
    field -= field.mean()
    field /= field.std() + 1e-12
    return field


def _bias_field(rng: np.random.Generator, grid: OutputGrid, center: np.ndarray, log_std: float) -> np.ndarray:
    """Smooth multiplicative field (float32, ``grid.shape``) whose log has std ``log_std``."""
    n = BIAS_ORDER + 2
    coefficients = rng.standard_normal((n, n, n))
    coefficients[1, :, :] = coefficients[:, 1, :] = coefficients[:, :, 1] = 0.0  # no linear rows
    coefficients[0, 0, 0] = 0.0
    bases = [cosine_basis(grid.axis_mm(d), center[d], BIAS_ORDER) for d in range(3)]
    log_field = separable(coefficients, bases)
    log_field -= log_field.mean()
    log_field *= log_std / (log_field.std() + 1e-12)
    return np.exp(log_field).astype(np.float32)


def _resample_axis(volume: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Linear interpolation along ``axis`` onto ``n_out`` evenly spaced voxels spanning the same extent
    (voxels as areas, ``grid_mode``; values beyond the edge voxels clamped, ``mode="nearest"``)."""
    n_in = volume.shape[axis]
    if n_in == n_out:
        return volume
    factors = [n_out / n_in if d == axis else 1.0 for d in range(volume.ndim)]
    return ndi.zoom(volume, factors, order=1, mode="nearest", grid_mode=True)


def _acquire(
    signal: np.ndarray, profile: ScannerProfile, rng: np.random.Generator, spacing_mm: float
) -> np.ndarray:
    """Slice thickness and Rician noise: blur and sample thick axes, add noise there, interpolate back.

    ``signal`` is in RAS axis order, so ``profile.acquisition_voxel_mm`` applies axis by axis.
    """
    thick = [d for d, size in enumerate(profile.acquisition_voxel_mm) if size > spacing_mm * 1.05]
    acquired = signal
    for d in thick:
        size = profile.acquisition_voxel_mm[d]
        # The output voxel already averages over spacing_mm; widen to the slice profile's variance.
        sigma = np.sqrt((size**2 - spacing_mm**2) / 12.0) / spacing_mm
        acquired = ndi.gaussian_filter1d(acquired, sigma, axis=d, mode="nearest")
        n_acquired = max(2, int(round(signal.shape[d] * spacing_mm / size)))
        acquired = _resample_axis(acquired, d, n_acquired)
    reference = max(profile.tissue_means.white_matter, profile.tissue_means.csf)
    sigma_noise = np.float32(profile.noise_level * reference)
    real = acquired + sigma_noise * rng.standard_normal(acquired.shape, dtype=np.float32)
    imaginary = sigma_noise * rng.standard_normal(acquired.shape, dtype=np.float32)
    acquired = np.sqrt(real * real + imaginary * imaginary)
    for d in reversed(thick):
        acquired = _resample_axis(acquired, d, signal.shape[d])
    return acquired


def _reoriented(data: np.ndarray, ras_affine: np.ndarray, axcodes: str) -> nib.Nifti1Image:
    """A NIfTI image of RAS-ordered ``data`` stored in voxel orientation ``axcodes`` (same world space)."""
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    target = nib.orientations.ornt_transform(ras, nib.orientations.axcodes2ornt(tuple(axcodes)))
    stored = np.ascontiguousarray(nib.orientations.apply_orientation(data, target))
    affine = ras_affine @ nib.orientations.inv_ornt_aff(target, data.shape)
    image = nib.Nifti1Image(stored, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def synthesize_subject(
    label_map: np.ndarray,
    label_affine: np.ndarray,
    profile: ScannerProfile,
    rng: np.random.Generator,
    spacing_mm: float = 2.0,
    deformation_spread: DeformationRange = SCANNER_DEFORMATION,
) -> tuple[nib.Nifti1Image, nib.Nifti1Image, nib.Nifti1Image]:
    """The image one simulated scanner acquires of one (randomly deformed) label map.

    Args:
        label_map: 3D FreeSurfer label map, any voxel orientation; int16 avoids a conversion.
        label_affine: its 4x4 voxel-to-world affine (mm, RAS world).
        profile: the scanner (contrast, bias, noise, slice thickness, field of view, orientation).
        rng: the subject's generator: deformation, field of view, intensities, texture, bias, noise.
        spacing_mm: isotropic output voxel size.
        deformation_spread: the spread of the subject's random affine and elastic deformation.

    Returns:
        ``(image, dseg, mask)`` on one grid and affine, stored in ``profile.orientation``:
        image float32 (scanner units, >= 0); dseg int16 FreeSurfer values of the deformed anatomy at
        each voxel centre; mask uint8, 1 inside the skull (brain, ventricles and CSF: dseg 1-499).
        The field of view covers the whole brain with at least ``MIN_FOV_MARGIN_MM`` to spare.
    """
    labels = as_label_array(label_map)
    label_affine = np.asarray(label_affine, dtype=float)
    brain_mask = (labels > 0) & (labels < NON_BRAIN_LABEL_MIN) & (labels != EXTRA_CEREBRAL_CSF)
    if not brain_mask.any():
        raise ValueError("label map contains no brain labels (values 1-499 other than 24)")
    brain_box = world_box(projections(brain_mask), label_affine)
    del brain_mask
    head_box = world_box(projections(labels > 0), label_affine)
    center = (brain_box[0] + brain_box[1]) / 2

    deformation = draw_deformation(rng, center, deformation_spread)
    # The brain must fit whatever the displacement; the head only limits how much air is kept.
    bound = deformation.displacement_bound(head_box[0] - 30.0, head_box[1] + 30.0)
    brain_out = preimage_box(*brain_box, deformation.matrix, bound)
    head_out = preimage_box(*head_box, deformation.matrix, np.zeros(3))
    grid = field_of_view(brain_out, head_out, profile, rng, spacing_mm)
    lut = _intensity_lut(profile, rng, int(labels.max()))
    coefficients = index_coefficients(deformation, label_affine)
    signal, dseg = _sample(labels, coefficients, grid, center, lut)

    signal *= 1.0 + profile.texture_std * _smooth_texture(rng, grid.shape, 1.0)
    signal *= _bias_field(rng, grid, center, profile.bias_field_std)
    image = _acquire(signal, profile, rng, spacing_mm)
    image *= np.float32(profile.intensity_scale)

    mask = ((dseg > 0) & (dseg < NON_BRAIN_LABEL_MIN)).astype(np.uint8)
    affine = grid.affine
    return (
        _reoriented(image.astype(np.float32, copy=False), affine, profile.orientation),
        _reoriented(dseg, affine, profile.orientation),
        _reoriented(mask, affine, profile.orientation),
    )
