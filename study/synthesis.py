"""Multi-site brain MRI synthesis: the project's default data and the federation's test bed.

``synthesize_subject`` turns one FreeSurfer label map into the image one simulated scanner would
acquire of it: a smooth random deformation (small affine + elastic), partial-volume sampling, a
per-label intensity lookup around the scanner's tissue means, within-tissue texture, a smooth bias
field, slice thickness, Rician noise, a field of view and the scanner's voxel orientation.
``synthesize_sites`` writes one BIDS dataset per simulated site.

Every random draw comes from ``numpy.random.Generator`` objects seeded from
``np.random.SeedSequence(seed, spawn_key=(stream, site, subject))``: output is the same for the
same seed, whatever the order or process in which sites and subjects are made.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from models.errors import NeurofedError
from models.label_protocols import NON_BRAIN_LABEL_MIN, TISSUE
from study.head_phantom import make_head_phantom
from study.scanner_profiles import (
    LABEL_TO_GROUP,
    MIN_FOV_MARGIN_MM,
    ScannerProfile,
    site_profiles,
    tissue_group,
)

if TYPE_CHECKING:
    from rich.progress import Progress

SUBJECT_STREAM = 1
"""First spawn-key element of the per-subject synthesis streams: ``(1, site, subject)``."""
PHANTOM_STREAM = 2
"""First spawn-key element of the per-subject phantom anatomy streams: ``(2, site, subject)``."""

EXTRA_CEREBRAL_CSF = 24
DEFORMATION_LENGTH_MM = 256.0
"""Length over which the elastic deformation's cosine basis spans half a period at its lowest order."""
ELASTIC_ORDER = 3
"""Highest cosine order of the elastic deformation: shortest half-wavelength 256 / 3 ~ 85 mm."""
BIAS_ORDER = 2
CHUNK_POINTS = 2_000_000
"""Sampling points per chunk: bounds memory (3 float64 coordinates each) whatever the volume size."""
BIDS_VERSION = "1.9.0"


# --------------------------------------------------------------------------------------------------
# One subject


@dataclass(frozen=True)
class _Deformation:
    """Maps output world points x (mm, RAS) to label-map world points ``M x + u(x)``.

    ``matrix`` is the 4x4 affine part M; ``elastic`` (3, K, K, K) holds the cosine coefficients (mm)
    of the smooth displacement u over :func:`_cosine_basis` about ``center``.
    """

    matrix: np.ndarray
    elastic: np.ndarray
    center: np.ndarray

    def displacement_bound(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Largest |u| (3,) mm per component over the box [lo, hi] mm, with 1 mm to spare.

        Sampled every 8 mm: u's shortest half-wavelength is ~85 mm, so it cannot peak between samples
        by more than a small fraction of a millimetre.
        """
        bases = []
        for d in range(3):
            coords = np.linspace(lo[d], hi[d], max(2, int(np.ceil((hi[d] - lo[d]) / 8.0)) + 1))
            full = _cosine_basis(coords, self.center[d], ELASTIC_ORDER)
            bases.append(full[[0] + list(range(2, ELASTIC_ORDER + 2))])  # constant and cosine rows
        return np.array([np.abs(_separable(self.elastic[c], bases)).max() for c in range(3)]) + 1.0


def _draw_deformation(rng: np.random.Generator, center: np.ndarray) -> _Deformation:
    """A small random affine (rotation, scaling, shear, shift about ``center``) plus a smooth elastic field."""
    angles = np.deg2rad(np.clip(rng.normal(0.0, 4.0, 3), -8.0, 8.0))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = rotation @ r
    scaling = np.diag(rng.uniform(0.96, 1.04) * np.exp(np.clip(rng.normal(0.0, 0.02, 3), -0.04, 0.04)))
    shear = np.eye(3) + np.triu(np.clip(rng.normal(0.0, 0.02, (3, 3)), -0.04, 0.04), 1)
    linear = rotation @ scaling @ shear
    shift = np.clip(rng.normal(0.0, 3.0, 3), -6.0, 6.0)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = center + shift - linear @ center

    k = ELASTIC_ORDER + 1
    a, b, c = np.meshgrid(*[np.arange(k)] * 3, indexing="ij")
    order2 = (a**2 + b**2 + c**2).astype(float)
    weight = np.where(order2 > 0, 1.0 / np.maximum(order2, 1.0), 0.0)
    # Mean square of a product of cosines is 1/2 per non-constant factor.
    mean_square = (weight**2 * 0.5 ** ((a > 0) + (b > 0) + (c > 0))).sum()
    rms_mm = rng.uniform(1.0, 2.5)
    elastic = rng.standard_normal((3, k, k, k)) * weight * (rms_mm / np.sqrt(mean_square))
    return _Deformation(matrix=matrix, elastic=elastic, center=np.asarray(center, float))


def _cosine_basis(coords_mm: np.ndarray, center_mm: float, order: int) -> np.ndarray:
    """Rows ``[1, x, cos(pi t), ..., cos(order pi t)]`` at ``coords_mm``, t = (x - center) / L + 1/2."""
    t = (coords_mm - center_mm) / DEFORMATION_LENGTH_MM + 0.5
    rows = [np.ones_like(coords_mm), coords_mm] + [np.cos(np.pi * n * t) for n in range(1, order + 1)]
    return np.stack(rows)


def _separable(coefficients: np.ndarray, bases: Sequence[np.ndarray]) -> np.ndarray:
    """``sum_abc C[a,b,c] B0[a,i] B1[b,j] B2[c,k]`` as an (i, j, k) float64 array."""
    b0, b1, b2 = bases
    t = np.tensordot(coefficients, b2, axes=(2, 0))  # (a, b, k)
    u = np.einsum("abk,bj->ajk", t, b1)  # (a, j, k)
    return (b0.T @ u.reshape(u.shape[0], -1)).reshape(b0.shape[1], b1.shape[1], b2.shape[1])


def _index_coefficients(deformation: _Deformation, label_affine: np.ndarray) -> np.ndarray:
    """Coefficients (3, 5, 5, 5) over :func:`_cosine_basis` rows giving label-map voxel indices.

    Index = inv(label_affine) @ (M x + u(x)); affine terms sit on the [1, x] rows, the elastic
    cosine terms on the cosine rows (cos order 0 is the constant row).
    """
    to_index = np.linalg.inv(label_affine)
    linear = to_index[:3, :3] @ deformation.matrix[:3, :3]
    offset = to_index[:3, :3] @ deformation.matrix[:3, 3] + to_index[:3, 3]
    n = ELASTIC_ORDER + 2
    coefficients = np.zeros((3, n, n, n))
    coefficients[:, 0, 0, 0] = offset
    coefficients[:, 1, 0, 0] = linear[:, 0]
    coefficients[:, 0, 1, 0] = linear[:, 1]
    coefficients[:, 0, 0, 1] = linear[:, 2]
    rows = np.array([0] + list(range(2, n)))  # cosine order -> basis row
    elastic_index = np.einsum("cd,dabe->cabe", to_index[:3, :3], deformation.elastic)
    coefficients[np.ix_(range(3), rows, rows, rows)] += elastic_index
    return coefficients


def _world_box(mask_any: Sequence[np.ndarray], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World (mm) bounding box of the voxels a mask marks, from its per-axis ``any`` projections."""
    lo_hi = []
    for proj in mask_any:
        idx = np.flatnonzero(proj)
        lo_hi.append((idx[0] - 0.5, idx[-1] + 0.5))
    corners = np.array(
        [[lo_hi[0][i], lo_hi[1][j], lo_hi[2][k], 1.0] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    )
    world = (affine @ corners.T)[:3]
    return world.min(axis=1), world.max(axis=1)


def _projections(mask: np.ndarray) -> list[np.ndarray]:
    return [mask.any(axis=tuple(a for a in range(3) if a != d)) for d in range(3)]


def _preimage_box(
    lo: np.ndarray, hi: np.ndarray, matrix: np.ndarray, bound: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Output-space box of every x with ``M x + u(x)`` in the label-world box [lo, hi], given |u| <= bound."""
    lo, hi = lo - bound, hi + bound
    corners = np.array(
        [[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    pre = (np.linalg.inv(matrix) @ corners.T)[:3]
    return pre.min(axis=1), pre.max(axis=1)


@dataclass(frozen=True)
class _OutputGrid:
    """Axis-aligned RAS output grid: voxel (i, j, k) centre at ``origin + spacing * (ijk + 0.5)`` mm."""

    origin: np.ndarray
    shape: tuple[int, int, int]
    spacing: float

    def axis_mm(self, d: int, subsamples: int = 1) -> np.ndarray:
        """Centres (mm) along axis d of the grid refined ``subsamples`` times."""
        step = self.spacing / subsamples
        return self.origin[d] + step * (np.arange(self.shape[d] * subsamples) + 0.5)

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([self.spacing] * 3 + [1.0])
        affine[:3, 3] = self.origin + self.spacing / 2
        return affine


def _field_of_view(
    brain: tuple[np.ndarray, np.ndarray],
    head: tuple[np.ndarray, np.ndarray],
    profile: ScannerProfile,
    rng: np.random.Generator,
    spacing_mm: float,
) -> _OutputGrid:
    """The site's crop of the head: its margins around the brain, at most 5 mm of air past the head."""
    margins = np.array(profile.fov_margin_mm) * rng.uniform(0.85, 1.15, (3, 2))
    margins = np.maximum(margins, MIN_FOV_MARGIN_MM)
    lo = np.maximum(brain[0] - margins[:, 0], head[0] - 5.0)
    hi = np.minimum(brain[1] + margins[:, 1], head[1] + 5.0)
    lo = np.minimum(lo, brain[0] - MIN_FOV_MARGIN_MM)
    hi = np.maximum(hi, brain[1] + MIN_FOV_MARGIN_MM)
    shape = np.ceil((hi - lo) / spacing_mm).astype(int)
    origin = (lo + hi) / 2 - shape * spacing_mm / 2
    return _OutputGrid(origin=origin, shape=tuple(int(n) for n in shape), spacing=float(spacing_mm))


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
    labels: np.ndarray, coefficients: np.ndarray, grid: _OutputGrid, center: np.ndarray, lut: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Partial-volume intensity and centre label on the output grid.

    Labels are sampled (nearest neighbour) at 2x2x2 sub-voxel points per output voxel; their lookup
    intensities are averaged, so a voxel that straddles two tissues gets a mix of both.

    Returns:
        ``(intensity float32, dseg int16)``, both of ``grid.shape``, RAS axis order.
    """
    nx, ny, nz = grid.shape
    fine = [_cosine_basis(grid.axis_mm(d, 2), center[d], ELASTIC_ORDER) for d in range(3)]
    coarse = [_cosine_basis(grid.axis_mm(d, 1), center[d], ELASTIC_ORDER) for d in range(3)]
    intensity = np.empty(grid.shape, dtype=np.float32)
    dseg = np.empty(grid.shape, dtype=np.int16)
    step = max(1, CHUNK_POINTS // (8 * ny * nz))
    for i0 in range(0, nx, step):
        i1 = min(nx, i0 + step)
        bases = [fine[0][:, 2 * i0 : 2 * i1], fine[1], fine[2]]
        coords = np.stack([_separable(coefficients[c], bases) for c in range(3)])
        sub = ndi.map_coordinates(labels, coords, order=0, mode="constant", cval=0, output=np.int16)
        values = np.take(lut, sub)
        values = values[0::2] + values[1::2]
        values = values[:, 0::2] + values[:, 1::2]
        intensity[i0:i1] = (values[:, :, 0::2] + values[:, :, 1::2]) * 0.125
        bases = [coarse[0][:, i0:i1], coarse[1], coarse[2]]
        coords = np.stack([_separable(coefficients[c], bases) for c in range(3)])
        dseg[i0:i1] = ndi.map_coordinates(labels, coords, order=0, mode="constant", cval=0, output=np.int16)
    return intensity, dseg


def _smooth_texture(rng: np.random.Generator, shape: tuple[int, ...], sigma_voxels: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed white noise (float32)."""
    field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_voxels)
    field -= field.mean()
    field /= field.std() + 1e-12
    return field


def _bias_field(
    rng: np.random.Generator, grid: _OutputGrid, center: np.ndarray, log_std: float
) -> np.ndarray:
    """Smooth multiplicative field (float32, ``grid.shape``) whose log has std ``log_std``."""
    n = BIAS_ORDER + 2
    coefficients = rng.standard_normal((n, n, n))
    coefficients[1, :, :] = coefficients[:, 1, :] = coefficients[:, :, 1] = 0.0  # no linear rows
    coefficients[0, 0, 0] = 0.0
    bases = [_cosine_basis(grid.axis_mm(d), center[d], BIAS_ORDER) for d in range(3)]
    log_field = _separable(coefficients, bases)
    log_field -= log_field.mean()
    log_field *= log_std / (log_field.std() + 1e-12)
    return np.exp(log_field).astype(np.float32)


def _resample_axis(volume: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Linear interpolation along ``axis`` onto ``n_out`` evenly spaced voxels spanning the same extent."""
    n_in = volume.shape[axis]
    if n_in == n_out:
        return volume
    q = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1.0)
    i0 = np.minimum(np.floor(q).astype(int), max(n_in - 2, 0))
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (q - i0).astype(np.float32).reshape([-1 if d == axis else 1 for d in range(volume.ndim)])
    return np.take(volume, i0, axis=axis) * (1.0 - w) + np.take(volume, i1, axis=axis) * w


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


def _as_label_array(label_map: np.ndarray) -> np.ndarray:
    labels = np.asarray(label_map)
    if labels.ndim != 3:
        raise ValueError(f"label map must be 3D, got shape {labels.shape}")
    if labels.dtype == np.int16:
        return labels
    if labels.dtype.kind == "f":
        labels = np.rint(labels)
    return labels.astype(np.int16)


def synthesize_subject(
    label_map: np.ndarray,
    label_affine: np.ndarray,
    profile: ScannerProfile,
    rng: np.random.Generator,
    spacing_mm: float = 2.0,
) -> tuple[nib.Nifti1Image, nib.Nifti1Image, nib.Nifti1Image]:
    """The image one simulated scanner acquires of one (randomly deformed) label map.

    Args:
        label_map: 3D FreeSurfer label map, any voxel orientation; int16 avoids a conversion.
        label_affine: its 4x4 voxel-to-world affine (mm, RAS world).
        profile: the scanner (contrast, bias, noise, slice thickness, field of view, orientation).
        rng: the subject's generator: deformation, field of view, intensities, texture, bias, noise.
        spacing_mm: isotropic output voxel size.

    Returns:
        ``(image, dseg, mask)`` on one grid and affine, stored in ``profile.orientation``:
        image float32 (scanner units, >= 0); dseg int16 FreeSurfer values of the deformed anatomy at
        each voxel centre; mask uint8, 1 inside the skull (brain, ventricles and CSF: dseg 1-499).
        The field of view covers the whole brain with at least ``MIN_FOV_MARGIN_MM`` to spare.
    """
    labels = _as_label_array(label_map)
    label_affine = np.asarray(label_affine, dtype=float)
    brain_mask = (labels > 0) & (labels < NON_BRAIN_LABEL_MIN) & (labels != EXTRA_CEREBRAL_CSF)
    if not brain_mask.any():
        raise ValueError("label map contains no brain labels (values 1-499 other than 24)")
    brain_box = _world_box(_projections(brain_mask), label_affine)
    del brain_mask
    head_box = _world_box(_projections(labels > 0), label_affine)
    center = (brain_box[0] + brain_box[1]) / 2

    deformation = _draw_deformation(rng, center)
    # The brain must fit whatever the displacement; the head only limits how much air is kept.
    bound = deformation.displacement_bound(head_box[0] - 30.0, head_box[1] + 30.0)
    brain_out = _preimage_box(*brain_box, deformation.matrix, bound)
    head_out = _preimage_box(*head_box, deformation.matrix, np.zeros(3))
    grid = _field_of_view(brain_out, head_out, profile, rng, spacing_mm)
    lut = _intensity_lut(profile, rng, int(labels.max()))
    coefficients = _index_coefficients(deformation, label_affine)
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


# --------------------------------------------------------------------------------------------------
# Label maps and sites


def find_label_maps(folder: Path) -> list[Path]:
    """The label maps (``*.nii``, ``*.nii.gz``) in ``folder``, sorted by name.

    Raises:
        NeurofedError: when the folder does not exist or holds no NIfTI file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NeurofedError(
            f"--label-maps {folder}: no such folder; give a folder of FreeSurfer label maps "
            "(*.nii.gz) or leave the option out to use the built-in head phantom"
        )
    maps = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
    if not maps:
        raise NeurofedError(
            f"--label-maps {folder}: no label maps (*.nii, *.nii.gz) in this folder; give a folder of "
            "FreeSurfer label maps or leave the option out to use the built-in head phantom"
        )
    return maps


def load_label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A FreeSurfer label map as ``(int16 array in its stored voxel order, 4x4 affine)``.

    Raises:
        NeurofedError: naming the file when it cannot be read, is not 3D, holds non-integer or
            negative values, or values the ``tissue`` protocol does not know (not FreeSurfer labels).
    """
    path = Path(path)
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for a broken or foreign file
        raise NeurofedError(f"{path}: cannot read as NIfTI ({exc}); replace or remove the file") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise NeurofedError(
            f"{path}: label map must be a 3D volume, got shape {data.shape}; give 3D label maps"
        )
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise NeurofedError(
                f"{path}: label map has non-integer values; it looks like an image, not a label map"
            )
        data = rounded
    if data.size and (data.min() < 0 or data.max() > np.iinfo(np.int16).max):
        raise NeurofedError(
            f"{path}: label values must lie in 0-32767 (FreeSurfer labels), found {data.min()}..{data.max()}"
        )
    labels = data.astype(np.int16)
    present = np.flatnonzero(np.bincount(labels.ravel()))
    unknown = TISSUE.unknown_values(present)
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise NeurofedError(
            f"{path}: values {shown} are not FreeSurfer labels; label maps must carry FreeSurfer "
            "values (see models/label_protocols.py), not class indices of another convention"
        )
    return labels, np.asarray(image.affine, dtype=float)


def _check_label_map_header(path: Path) -> None:
    """Fail before anything is written when a label map is unreadable or not 3D (header only)."""
    try:
        shape = nib.load(path).shape
    except Exception as exc:  # nibabel raises many types for a broken or foreign file
        raise NeurofedError(f"{path}: cannot read as NIfTI ({exc}); replace or remove the file") from exc
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
        raise NeurofedError(f"{path}: label map must be a 3D volume, got shape {shape}; give 3D label maps")


def _subject_rng(seed: int, stream: int, site: int, subject: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, site, subject)))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("neurofed")
    except PackageNotFoundError:
        return "unknown"


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def _progress() -> Progress:
    """A rich progress bar on stderr, shown only when stderr is a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def synthesize_sites(
    out_dir: Path,
    n_sites: int = 4,
    subjects_per_site: int = 6,
    label_maps_dir: Path | None = None,
    spacing_mm: float = 2.0,
    seed: int = 0,
    overwrite: bool = False,
    contrasts: str | Sequence[str] | None = None,
    phantom_spacing_mm: float | None = None,
) -> list[Path]:
    """Write ``out_dir/site-01`` ... ``site-NN``, one BIDS dataset per simulated scanner.

    Each site folder holds ``dataset_description.json``, ``participants.tsv``,
    ``sub-001/anat/sub-001_<weighting>.nii.gz`` (float32), ``derivatives/labels/sub-001/anat/``
    ``sub-001_dseg.nii.gz`` (int16 FreeSurfer values) and ``sub-001_desc-brain_mask.nii.gz`` (uint8,
    1 inside the skull: brain, ventricles and CSF), all three on one grid and affine, and
    ``site.json`` (the scanner profile, seed and random streams).

    Anatomy: with ``label_maps_dir``, site s (0-based) subject k uses map ``(s*K + k) mod M`` of the
    M maps sorted by name, so sites get disjoint maps when there are enough; without it, a procedural
    head phantom per subject, generated at ``phantom_spacing_mm`` (default: 0.75 x spacing_mm, within
    1-2 mm). Each site is built in a hidden temporary folder beside it and renamed into place when
    complete, so an interrupted run leaves no half-written site.

    Args:
        contrasts: weightings cycled over sites, e.g. ``"T1w,T2w,PDw"``; default all T1w.

    Returns:
        The site folders, in site order.

    Raises:
        NeurofedError: for bad options, unreadable or non-3D label maps, or site folders that exist
            already (unless ``overwrite``): then nothing is written. A label map whose values are not
            FreeSurfer labels stops the run at the first site that uses it; sites finished before it
            stay complete, the unfinished one is removed.
    """
    out_dir = Path(out_dir)
    if subjects_per_site < 1:
        raise NeurofedError(f"--subjects-per-site {subjects_per_site}: need at least 1 subject per site")
    if not 0.5 <= spacing_mm <= 8.0:
        raise NeurofedError(f"--spacing {spacing_mm}: output voxel size must be 0.5-8 mm")
    if seed < 0:
        raise NeurofedError(f"--seed {seed}: the seed must be a non-negative integer")
    profiles = site_profiles(n_sites, seed, contrasts)
    maps = find_label_maps(label_maps_dir) if label_maps_dir is not None else []
    used = maps[: n_sites * subjects_per_site]
    for path in used:
        _check_label_map_header(path)
    if phantom_spacing_mm is None:
        phantom_spacing_mm = float(np.clip(0.75 * spacing_mm, 1.0, 2.0))
    site_width = max(2, len(str(n_sites)))
    subject_width = max(3, len(str(subjects_per_site)))
    site_names = [f"site-{s + 1:0{site_width}d}" for s in range(n_sites)]
    existing = [name for name in site_names if (out_dir / name).exists()]
    if existing and not overwrite:
        raise NeurofedError(
            f"{out_dir}: site folders already exist ({', '.join(existing)}); "
            "pass --overwrite to replace them or choose another output folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    load = functools.lru_cache(maxsize=2)(load_label_map)

    site_dirs = []
    with _progress() as progress:
        task = progress.add_task("synthesizing", total=n_sites * subjects_per_site)
        for s, (name, profile) in enumerate(zip(site_names, profiles, strict=True)):
            progress.update(task, description=f"{name} ({profile.name}, {profile.weighting})")
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out_dir))
            try:
                subjects = []
                for k in range(subjects_per_site):
                    subject_id = f"sub-{k + 1:0{subject_width}d}"
                    if maps:
                        source = maps[(s * subjects_per_site + k) % len(maps)]
                        labels, affine = load(source)
                        anatomy = source.name
                    else:
                        labels, affine = make_head_phantom(
                            _subject_rng(seed, PHANTOM_STREAM, s, k), spacing_mm=phantom_spacing_mm
                        )
                        anatomy = "phantom"
                    rng = _subject_rng(seed, SUBJECT_STREAM, s, k)
                    images = synthesize_subject(labels, affine, profile, rng, spacing_mm)
                    subjects.append(_write_subject(staging, subject_id, profile.weighting, images, anatomy))
                    progress.advance(task)
                _write_site_metadata(
                    staging, name, profile, subjects, seed, s, spacing_mm, label_maps_dir, phantom_spacing_mm
                )
                site_dirs.append(_commit(staging, out_dir / name))
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    if not progress.disable:
        print(f"wrote {n_sites} site(s) to {out_dir}", file=sys.stderr)
    return site_dirs


def _write_subject(
    site_dir: Path,
    subject_id: str,
    weighting: str,
    images: tuple[nib.Nifti1Image, nib.Nifti1Image, nib.Nifti1Image],
    anatomy: str,
) -> dict:
    image, dseg, mask = images
    paths = {
        "image": Path(subject_id, "anat", f"{subject_id}_{weighting}.nii.gz"),
        "dseg": Path("derivatives", "labels", subject_id, "anat", f"{subject_id}_dseg.nii.gz"),
        "mask": Path("derivatives", "labels", subject_id, "anat", f"{subject_id}_desc-brain_mask.nii.gz"),
    }
    for key, img in zip(("image", "dseg", "mask"), images, strict=True):
        target = site_dir / paths[key]
        target.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, target)
    return {
        "participant_id": subject_id,
        "anatomy": anatomy,
        "shape": [int(n) for n in image.shape],
        "orientation": "".join(nib.aff2axcodes(image.affine)),
        **{key: str(p) for key, p in paths.items()},
    }


def _write_site_metadata(
    site_dir: Path,
    name: str,
    profile: ScannerProfile,
    subjects: list[dict],
    seed: int,
    site_index: int,
    spacing_mm: float,
    label_maps_dir: Path | None,
    phantom_spacing_mm: float,
) -> None:
    generated_by = [{"Name": "neurofed synth", "Version": _version()}]
    _write_json(
        site_dir / "dataset_description.json",
        {
            "Name": f"neurofed simulated {name} ({profile.name}, {profile.weighting})",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "GeneratedBy": generated_by,
        },
    )
    _write_json(
        site_dir / "derivatives" / "labels" / "dataset_description.json",
        {
            "Name": f"neurofed simulated {name}: FreeSurfer label maps and brain masks",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": generated_by,
        },
    )
    rows = ["participant_id\tanatomy"] + [f"{s['participant_id']}\t{s['anatomy']}" for s in subjects]
    (site_dir / "participants.tsv").write_text("\n".join(rows) + "\n")
    _write_json(
        site_dir / "participants.json",
        {"anatomy": {"Description": "label map the subject's anatomy was deformed from, or 'phantom'"}},
    )
    _write_json(
        site_dir / "site.json",
        {
            "site": name,
            "seed": seed,
            "random_streams": {
                "profile": [0, site_index],
                "subject_synthesis": [SUBJECT_STREAM, site_index, "subject index"],
                "phantom_anatomy": [PHANTOM_STREAM, site_index, "subject index"],
                "how": "numpy.random.SeedSequence(seed, spawn_key=stream)",
            },
            "spacing_mm": spacing_mm,
            "anatomy": "label_maps" if label_maps_dir is not None else "phantom",
            "label_maps_dir": str(label_maps_dir) if label_maps_dir is not None else None,
            "phantom_spacing_mm": None if label_maps_dir is not None else phantom_spacing_mm,
            "scanner_profile": profile.to_dict(),
            "subjects": subjects,
            "generated_by": generated_by,
        },
    )


def _commit(staging: Path, final: Path) -> Path:
    """Move the complete site from ``staging`` to ``final``, replacing an existing folder last."""
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / final.name)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
    return final
