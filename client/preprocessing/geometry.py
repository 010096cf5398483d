"""Geometry of the training grid: canonical reorientation, resampling, and the field-of-view window.

Every map here is a (4, 4) homogeneous voxel -> voxel (or voxel -> world, mm) affine. Steps 1-3 of the
pipeline (see `client.preprocessing`) live here:

1. `_to_canonical` reorients to RAS+ voxel order (a pure transpose/flip, no interpolation).
2. `_lattice` and `_resample` put the image on the plan's spacing along the canonical voxel axes, with
   `_anti_alias` smoothing first when downsampling.
3. `_window_start` and `_crop_or_pad` cut the ``grid_shape`` window around the head (integer voxels).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nibabel import orientations
from scipy import ndimage

from client.preprocessing.plan import PreprocessingPlan

_SPACING_REL_TOL = 1e-4
"""Native spacings within this relative distance of the target count as equal (float32 header noise), so
the resampling is a pure voxel copy."""
_INTEGER_TOL = 1e-6
"""Voxel-map entries this close to an integer are snapped to it, so that an integer shift stays exact."""
_CANONICAL_ORNT = orientations.axcodes2ornt(("R", "A", "S"))


def _to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (I, J, K) reordered/flipped into RAS+ voxel order (a view), and its voxel -> world affine."""
    ornt = orientations.io_orientation(affine)
    canonical = orientations.apply_orientation(array, ornt)
    return canonical, affine @ orientations.inv_ornt_aff(ornt, array.shape[:3])


def _from_canonical(array: np.ndarray, native_affine: np.ndarray) -> np.ndarray:
    """Inverse of `_to_canonical`: a canonical-order array back into the native file's axis order."""
    back = orientations.ornt_transform(_CANONICAL_ORNT, orientations.io_orientation(native_affine))
    return np.ascontiguousarray(orientations.apply_orientation(array, back))


def _snap(voxel_map: np.ndarray) -> np.ndarray:
    """Round near-integer entries, so that float noise in affine products cannot spoil an exact shift."""
    rounded = np.round(voxel_map)
    return np.where(np.abs(voxel_map - rounded) < _INTEGER_TOL, rounded, voxel_map)


def _is_diagonal(voxel_map: np.ndarray) -> bool:
    """True when the (4, 4) map only scales (positive factors) and shifts each axis: no rotation or flip."""
    linear = voxel_map[:3, :3]
    return bool(np.all(linear[~np.eye(3, dtype=bool)] == 0) and np.all(np.diag(linear) > 0))


def _resample(
    array: np.ndarray, voxel_map: np.ndarray, out_shape: Sequence[int], order: int, cval: float = 0.0
) -> np.ndarray:
    """Sample ``array`` at ``voxel_map @ [j, 1]`` for every output voxel j; float32 ``out_shape``.

    ``voxel_map``: (4, 4) output voxel -> input voxel. Outside the input the value is ``cval``, and within
    one voxel of the edge it is interpolated towards ``cval`` (as scipy's ``grid-constant`` mode, which is
    several times slower than padding by one voxel and using ``constant``).
    """
    voxel_map = _snap(voxel_map)
    padded = np.pad(np.asarray(array, dtype=np.float32), 1, mode="constant", constant_values=cval)
    # A 1-D matrix selects scipy's separable algorithm: much faster for the axis-aligned case.
    matrix = np.diag(voxel_map[:3, :3]).copy() if _is_diagonal(voxel_map) else voxel_map[:3, :3]
    return ndimage.affine_transform(
        padded,
        matrix,
        offset=voxel_map[:3, 3] + 1.0,
        output_shape=tuple(int(n) for n in out_shape),
        output=np.float32,
        order=order,
        mode="constant",
        cval=cval,
        prefilter=order > 1,
    )


def _input_steps(voxel_map: np.ndarray) -> np.ndarray:
    """Input voxels travelled per output voxel, along each input axis: >1 means downsampling there."""
    return np.abs(voxel_map[:3, :3]).max(axis=1)


def _anti_alias(array: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Gaussian-smooth (X, Y, Z) ``array`` before a downsampling of ``steps`` input voxels per axis.

    Sigma is ``(step - 1) / 2`` input voxels per axis (scikit-image's ``resize``); none when no step exceeds 1.
    """
    sigma = np.maximum(0.0, (steps - 1.0) / 2.0)
    return ndimage.gaussian_filter(array, sigma) if np.any(sigma > 0) else array


def _translation(shift: Sequence[float]) -> np.ndarray:
    """(4, 4) affine that adds ``shift`` (three voxel or mm offsets) to a point."""
    t = np.eye(4)
    t[:3, 3] = shift
    return t


def _lattice(
    canonical_affine: np.ndarray, canonical_shape: Sequence[int], plan: PreprocessingPlan
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The plan's lattice over a canonical image: (lattice voxel -> canonical voxel map, lattice shape).

    Lattice voxel j covers canonical voxels [j * f - 0.5, (j + 1) * f - 0.5), f = target / native spacing,
    so its centre is at ``j * f + (f - 1) / 2`` and a factor of exactly 1 is an identity.
    """
    native_spacing = np.linalg.norm(canonical_affine[:3, :3], axis=0)
    factor = np.asarray(plan.target_spacing_mm) / native_spacing
    factor = np.where(np.abs(factor - 1.0) < _SPACING_REL_TOL, 1.0, factor)
    lattice_to_canonical = np.diag([*factor, 1.0])
    lattice_to_canonical[:3, 3] = (factor - 1.0) / 2.0
    shape = np.maximum(1, np.ceil(np.asarray(canonical_shape) / factor - 1e-6)).astype(int)
    return lattice_to_canonical, tuple(int(n) for n in shape)


def _window_start(mask: np.ndarray, grid_shape: Sequence[int], crop_neck_first: bool) -> np.ndarray:
    """Lattice index of the grid's first voxel along each axis: the grid centred on ``mask``'s box."""
    nonzero = (
        np.nonzero(mask.any(axis=(1, 2))),
        np.nonzero(mask.any(axis=(0, 2))),
        np.nonzero(mask.any(axis=(0, 1))),
    )
    lo = np.array([n[0][0] for n in nonzero])
    hi = np.array([n[0][-1] for n in nonzero])
    size = np.asarray(grid_shape)
    start = (lo + hi + 1 - size) // 2
    # Axis 2 is inferior -> superior: a head taller than the grid loses its neck, never its vertex.
    if crop_neck_first and hi[2] - lo[2] + 1 > size[2]:
        start[2] = hi[2] + 1 - size[2]
    return start


def _crop_or_pad(
    array: np.ndarray, start: Sequence[int], shape: Sequence[int], fill: float = 0
) -> np.ndarray:
    """``array[start:start + shape]`` over the last three axes, ``fill`` where that lies outside ``array``."""
    out = np.full(array.shape[:-3] + tuple(shape), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, size in zip(start, shape, array.shape[-3:], strict=True):
        a, b = max(s, 0), min(s + n, size)
        if a >= b:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[(..., *dst)] = array[(..., *src)]
    return out
