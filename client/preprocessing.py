"""Preprocessing onto a fixed training grid, and its exact inverse back onto the subject's native grid.

The decisions are data: a `PreprocessingPlan` (nnU-Net's "plan") says which contrasts feed the network, the
target voxel spacing, the field of view, intensity clipping and normalisation. Every preprocessed array sits
on a grid whose voxel -> world affine is recorded in a `NativeTransform`, so a prediction made on the grid
maps back onto the native voxels of the scan it came from.

Steps, for an image (or several co-registered contrasts, the first one being the reference grid):

1. Reorient to canonical RAS+ voxel order with nibabel (a pure transpose/flip: no interpolation).
2. Resample to ``target_spacing_mm`` along the canonical voxel axes (as MONAI's ``Spacing`` without
   ``diagonal``: oblique scans keep their obliquity, so no rotation is interpolated). The grid's voxel
   boundaries coincide with native voxel boundaries, so a plan spacing equal to the native spacing is a
   pure voxel copy, and 1 mm -> 2 mm averages each 2x2x2 block. Downsampling is anti-aliased with a
   Gaussian of sigma ``(factor - 1) / 2`` input voxels (scikit-image's ``resize`` convention).
3. Crop/pad (an integer voxel window, so no further interpolation) to ``grid_shape`` centred on the head's
   bounding box. The head is the largest connected component above FSL BET's threshold of the reference
   image, holes filled. When the head is taller than the field of view (scans that include the neck), the
   window keeps the vertex and cuts the neck (``crop_neck_first``).
4. Clip each contrast to ``clip_percentiles`` of its intensities inside the mask, then z-score inside it.
   The mask is the subject's brain mask when it has one, else the head mask of step 3.

Labels are first mapped from FreeSurfer values to protocol classes, then resampled as one-hot class maps
with linear interpolation followed by argmax, which keeps thin structures such as cortex that nearest
neighbour interpolation erodes. The inverse (`labels_to_native`, `probabilities_to_native`) does the same
in the other direction. Voxels outside the grid are background (class 0).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

from client.subjects import SubjectFiles
from models.errors import NeurofedError
from models.label_protocols import LabelProtocol

NORMALIZATIONS: tuple[str, ...] = ("zscore", "none")
"""``zscore``: clip, then zero mean / unit variance inside the mask. ``none``: clip only."""

_SPACING_REL_TOL = 1e-4
"""Native spacings within this relative distance of the target count as equal (float32 header noise), so
the resampling is a pure voxel copy."""
_INTEGER_TOL = 1e-6
"""Voxel-map entries this close to an integer are snapped to it, so that an integer shift stays exact."""
_CANONICAL_ORNT = orientations.axcodes2ornt(("R", "A", "S"))
_MAX_FREESURFER_LABEL = 1 << 16
"""Label values at or above this are no FreeSurfer labels (the lookup table stops at 14175)."""


def _as_float_triple(value: Sequence[float], name: str) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise NeurofedError(f"preprocessing plan: {name} must be three numbers (mm), got {value!r}") from None
    if len(triple) != 3 or not all(math.isfinite(v) and v > 0 for v in triple):
        raise NeurofedError(f"preprocessing plan: {name} must be three positive numbers (mm), got {value!r}")
    return triple  # type: ignore[return-value]


@dataclass(frozen=True)
class PreprocessingPlan:
    """How a site turns a scan into the network's input. Shared by all sites of a federation.

    Attributes:
        input_contrasts: BIDS suffixes of the images stacked as input channels, in channel order; the
            first one is the reference grid that predictions map back onto.
        target_spacing_mm: voxel size of the grid along the canonical (R, A, S) voxel axes, in mm.
        field_of_view_mm: extent of the grid in mm, RAS axis order. The default (192, 224, 192) holds a
            whole adult head and most of the skull (left-right, anterior-posterior, inferior-superior);
            on 15 real 1 mm whole-head label maps at most 0.22% of the tissue classes (lower brain-stem
            and spinal CSF in scans that include the neck) falls outside it.
        clip_percentiles: lower and upper intensity percentiles (0-100) inside the mask to clip to.
        normalization: one of `NORMALIZATIONS`, computed inside the subject's brain mask when it has
            one, else inside the head mask (`head_mask` of the reference image).
        image_interpolation: spline order for images (0 nearest, 1 linear, 3 cubic; 0-5).
        crop_neck_first: when the head is taller than the field of view, keep the vertex and cut inferiorly.
    """

    input_contrasts: tuple[str, ...] = ("T1w",)
    target_spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    field_of_view_mm: tuple[float, float, float] = (192.0, 224.0, 192.0)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    normalization: str = "zscore"
    image_interpolation: int = 1
    crop_neck_first: bool = True

    def __post_init__(self) -> None:
        # Coerce JSON lists and ints so that equal plans have equal fingerprints.
        contrasts = (
            (self.input_contrasts,) if isinstance(self.input_contrasts, str) else tuple(self.input_contrasts)
        )
        if not contrasts or not all(isinstance(c, str) and c for c in contrasts):
            raise NeurofedError(
                f"preprocessing plan: input_contrasts must name at least one contrast (e.g. ['T1w']), got "
                f"{self.input_contrasts!r}"
            )
        if len(set(contrasts)) != len(contrasts):
            raise NeurofedError(
                f"preprocessing plan: input_contrasts lists a contrast twice: {list(contrasts)}"
            )
        object.__setattr__(self, "input_contrasts", contrasts)
        spacing = _as_float_triple(self.target_spacing_mm, "target_spacing_mm")
        fov = _as_float_triple(self.field_of_view_mm, "field_of_view_mm")
        object.__setattr__(self, "target_spacing_mm", spacing)
        object.__setattr__(self, "field_of_view_mm", fov)
        if any(f < s for f, s in zip(fov, spacing, strict=True)):
            raise NeurofedError(
                f"preprocessing plan: field_of_view_mm {list(fov)} is smaller than one voxel of "
                f"target_spacing_mm {list(spacing)}; give the field of view in mm, not voxels"
            )
        try:
            lo, hi = (float(p) for p in self.clip_percentiles)
        except (TypeError, ValueError):
            raise NeurofedError(
                f"preprocessing plan: clip_percentiles must be two numbers, got {self.clip_percentiles!r}"
            ) from None
        if not 0.0 <= lo < hi <= 100.0:
            raise NeurofedError(
                f"preprocessing plan: clip_percentiles must satisfy 0 <= low < high <= 100, got {[lo, hi]}"
            )
        object.__setattr__(self, "clip_percentiles", (lo, hi))
        if self.normalization not in NORMALIZATIONS:
            raise NeurofedError(
                f"preprocessing plan: normalization {self.normalization!r} is not one of "
                f"{list(NORMALIZATIONS)}"
            )
        if isinstance(self.image_interpolation, bool) or self.image_interpolation not in range(6):
            raise NeurofedError(
                f"preprocessing plan: image_interpolation must be a spline order 0-5, got "
                f"{self.image_interpolation!r}"
            )
        if not isinstance(self.crop_neck_first, bool):
            raise NeurofedError(
                f"preprocessing plan: crop_neck_first must be true or false, got {self.crop_neck_first!r}"
            )

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Voxels of the grid along (R, A, S): field of view / spacing, rounded."""
        return tuple(  # type: ignore[return-value]
            max(1, round(f / s)) for f, s in zip(self.field_of_view_mm, self.target_spacing_mm, strict=True)
        )

    def to_dict(self) -> dict:
        """JSON-serialisable form (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> PreprocessingPlan:
        """Inverse of `to_dict`. Missing keys take their defaults; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NeurofedError(
                f"preprocessing plan: unknown field(s) {unknown}; known fields are {sorted(known)} "
                "(was the plan written by a newer neurofed?)"
            )
        return cls(**dict(d))

    def fingerprint(self) -> str:
        """Stable 16-hex-digit hash of the plan: equal for equal plans, across processes and machines."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class NativeTransform:
    """Where the preprocessed grid sits relative to the subject's native (reference image) voxel grid.

    Attributes:
        native_shape: (I, J, K) voxels of the native reference image, in its own (file) axis order.
        native_affine: (4, 4) float64 native voxel -> world (scanner RAS+, mm).
        grid_shape: (X, Y, Z) voxels of the preprocessed grid.
        grid_affine: (4, 4) float64 grid voxel -> world (RAS+, mm); its axes follow the canonical RAS
            order of the native image, its columns have the plan's spacing as length.
    """

    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    grid_shape: tuple[int, int, int]
    grid_affine: np.ndarray

    def to_dict(self) -> dict:
        return {
            "native_shape": list(self.native_shape),
            "native_affine": np.asarray(self.native_affine, dtype=float).tolist(),
            "grid_shape": list(self.grid_shape),
            "grid_affine": np.asarray(self.grid_affine, dtype=float).tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> NativeTransform:
        return cls(
            native_shape=tuple(int(v) for v in d["native_shape"]),  # type: ignore[arg-type]
            native_affine=np.asarray(d["native_affine"], dtype=np.float64).reshape(4, 4),
            grid_shape=tuple(int(v) for v in d["grid_shape"]),  # type: ignore[arg-type]
            grid_affine=np.asarray(d["grid_affine"], dtype=np.float64).reshape(4, 4),
        )


@dataclass(eq=False)
class PreprocessedSubject:
    """One subject on the plan's grid.

    Attributes:
        image: float32 (C, X, Y, Z), C = ``len(plan.input_contrasts)``, normalised intensities.
        label: uint8 (X, Y, Z) protocol class indices, or None for unlabelled subjects.
        transform: how to map grid arrays back onto the native reference image.
        plan_fingerprint: `PreprocessingPlan.fingerprint` of the plan that made it.
    """

    subject_id: str
    image: np.ndarray
    label: np.ndarray | None
    transform: NativeTransform
    plan_fingerprint: str


# --- geometry -------------------------------------------------------------------------------------------


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
    sigma = np.maximum(0.0, (steps - 1.0) / 2.0)
    return ndimage.gaussian_filter(array, sigma) if np.any(sigma > 0) else array


def _translation(shift: Sequence[float]) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = shift
    return t


def _lattice(canonical_affine: np.ndarray, canonical_shape: Sequence[int], plan: PreprocessingPlan):
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


# --- masks and intensities ---------------------------------------------------------------------------------


def head_threshold(image: np.ndarray) -> float:
    """FSL BET's head/background threshold: 10% of the way from the 2nd to the 98th intensity percentile.

    Otsu's threshold is no use here: a head has several tissue classes, and Otsu often splits between
    them (e.g. dark skull/CSF vs brain) rather than between air and head.
    """
    low, high = np.percentile(image, (2.0, 98.0))
    return float(low + 0.1 * (high - low))


def head_mask(image: np.ndarray) -> np.ndarray:
    """Bool mask of the head in a 3-D image: above `head_threshold`, largest component, holes filled.

    Args:
        image: float (X, Y, Z) intensities, air dark.
    """
    foreground = image > head_threshold(image)
    components, count = ndimage.label(foreground)
    if count == 0:
        return foreground
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(components == int(sizes.argmax()))


def _normalize(channel: np.ndarray, mask: np.ndarray, plan: PreprocessingPlan, source: str) -> np.ndarray:
    inside = channel[mask]
    lo, hi = np.percentile(inside, plan.clip_percentiles)
    channel = np.clip(channel, lo, hi)
    if plan.normalization == "none":
        return channel
    inside = channel[mask]
    std = float(inside.std())
    if not std > 0:
        raise NeurofedError(
            f"{source}: the image is constant inside the head/brain mask, so it cannot be normalised; "
            "check that the file holds an MRI scan"
        )
    return (channel - float(inside.mean())) / std


# --- images ------------------------------------------------------------------------------------------------


def _image_array(image: nib.Nifti1Image, source: str) -> np.ndarray:
    if image.ndim == 4 and image.shape[3] == 1:
        image = image.slicer[..., 0]
    if image.ndim != 3:
        raise NeurofedError(
            f"{source}: image has shape {image.shape}; preprocessing needs one 3-D volume per contrast "
            "(split 4-D series and pick one volume)"
        )
    array = image.get_fdata(dtype=np.float32)
    if not np.isfinite(array).all():
        raise NeurofedError(f"{source}: image contains NaN or infinite values; fix or re-export the file")
    return array


def _source(image: nib.Nifti1Image, fallback: str) -> str:
    name = image.get_filename()
    return str(name) if name else fallback


def _grid_image(
    images: Sequence[nib.Nifti1Image], plan: PreprocessingPlan, mask: nib.Nifti1Image | None
) -> tuple[np.ndarray, NativeTransform]:
    if len(images) != len(plan.input_contrasts):
        raise NeurofedError(
            f"preprocessing: got {len(images)} image(s) for the plan's input contrasts "
            f"{list(plan.input_contrasts)}; pass one image per contrast, in that order"
        )
    sources = [_source(img, f"<{c} image>") for img, c in zip(images, plan.input_contrasts, strict=True)]
    reference = _image_array(images[0], sources[0])
    canonical, canonical_affine = _to_canonical(reference, images[0].affine)

    # The reference goes onto the whole lattice first: its head mask places the window, and the window
    # is then an integer slice of the lattice, so no second interpolation.
    lattice_map, lattice_shape = _lattice(canonical_affine, canonical.shape, plan)
    lattice = _resample(
        _anti_alias(canonical, _input_steps(lattice_map)),
        lattice_map,
        lattice_shape,
        plan.image_interpolation,
    )
    head = head_mask(lattice)
    if not head.any():
        raise NeurofedError(
            f"{sources[0]}: no head found (the image is blank); check that the file holds an MRI"
        )
    start = _window_start(head, plan.grid_shape, plan.crop_neck_first)
    grid_affine = canonical_affine @ lattice_map @ _translation(start)
    transform = NativeTransform(
        native_shape=tuple(int(n) for n in reference.shape),  # type: ignore[arg-type]
        native_affine=np.asarray(images[0].affine, dtype=np.float64),
        grid_shape=plan.grid_shape,
        grid_affine=grid_affine,
    )

    channels = [_crop_or_pad(lattice, start, plan.grid_shape)]
    for img, source in zip(images[1:], sources[1:], strict=True):
        other, other_affine = _to_canonical(_image_array(img, source), img.affine)
        voxel_map = np.linalg.inv(other_affine) @ grid_affine
        other = _anti_alias(other, _input_steps(voxel_map))
        channels.append(_resample(other, voxel_map, plan.grid_shape, plan.image_interpolation))

    if mask is None:
        region = _crop_or_pad(head, start, plan.grid_shape, fill=False)
        region_name = "head mask"
    else:
        mask_source = _source(mask, "<mask>")
        mask_array, mask_affine = _to_canonical(_image_array(mask, mask_source) > 0, mask.affine)
        voxel_map = np.linalg.inv(mask_affine) @ grid_affine
        region = _resample(mask_array.astype(np.float32), voxel_map, plan.grid_shape, order=1) >= 0.5
        region_name = f"brain mask {mask_source}"
    if not region.any():
        raise NeurofedError(
            f"{sources[0]}: the {region_name} is empty inside the {list(plan.field_of_view_mm)} mm field of "
            "view; check that mask and image overlap and that the image holds a head"
        )
    image = np.stack([_normalize(c, region, plan, s) for c, s in zip(channels, sources, strict=True)])
    return image.astype(np.float32, copy=False), transform


def preprocess_volume(
    images: list[nib.Nifti1Image], plan: PreprocessingPlan, mask: nib.Nifti1Image | None = None
) -> tuple[np.ndarray, NativeTransform]:
    """Preprocess a label-free scan for inference.

    Args:
        images: one image per ``plan.input_contrasts``, same order; the first is the reference grid.
        mask: optional brain mask (nonzero = brain) used for normalisation instead of the head mask.

    Returns:
        float32 (C, X, Y, Z) on the plan's grid, and the transform back to the first image's voxels.
    """
    return _grid_image(images, plan, mask)


# --- labels and probabilities -------------------------------------------------------------------------------

_Score = tuple[int, Callable[[tuple[slice, ...]], np.ndarray], tuple[slice, ...] | None, float]
"""(class, input region -> score map there, box outside which the class cannot win or None, value outside)."""


def _argmax_resampled(
    scores: Iterable[_Score],
    voxel_map: np.ndarray,
    out_shape: Sequence[int],
    input_shape: Sequence[int],
    residual_background: bool,
    smoothing: np.ndarray | None = None,
) -> np.ndarray:
    """Argmax over classes of per-class score maps, each resampled linearly onto ``out_shape``; uint8.

    Classes are streamed one at a time (memory of one score map), each only over the output voxels whose
    interpolation stencil reaches its box. Classes must come in increasing order; ties go to the lower
    class, as ``np.argmax``.

    Args:
        voxel_map: (4, 4) output voxel -> input voxel.
        residual_background: class 0 is not among ``scores`` and is 1 - the sum of the others (one-hot
            inputs, whose linear interpolation keeps that sum at 1). Otherwise class 0 comes first, whole.
        smoothing: Gaussian sigma (input voxels) per input axis applied before resampling, or None.
    """
    voxel_map = _snap(voxel_map)
    out_shape = tuple(int(n) for n in out_shape)
    full_in = tuple(slice(0, int(n)) for n in input_shape)
    full_out = tuple(slice(0, n) for n in out_shape)
    best = np.zeros(out_shape, dtype=np.float32)
    best_class = np.zeros(out_shape, dtype=np.uint8)
    total = np.zeros(out_shape, dtype=np.float32) if residual_background else None
    diagonal = _is_diagonal(voxel_map)
    margin = 1 + (0 if smoothing is None else int(np.ceil(4 * float(np.max(smoothing)))))
    for cls, region_of, box, cval in scores:
        in_box, out_box, local_map = full_in, full_out, voxel_map
        if box is not None and diagonal:
            scale, offset = np.diag(voxel_map)[:3], voxel_map[:3, 3]
            # The class reaches input coordinates [lo - margin, hi + margin] (stencil + smoothing), so
            # only output voxels mapping there can score, and only input voxels there are needed.
            reach_lo = np.array([s.start for s in box]) - margin
            reach_hi = np.array([s.stop - 1 for s in box]) + margin
            in_lo = np.maximum(reach_lo, 0)
            in_hi = np.minimum(reach_hi, np.asarray(input_shape) - 1)
            out_lo = np.maximum(np.ceil((reach_lo - offset) / scale), 0).astype(int)
            out_hi = np.minimum(np.floor((reach_hi - offset) / scale), np.asarray(out_shape) - 1).astype(int)
            if np.any(out_hi < out_lo):
                continue
            in_box = tuple(slice(int(a), int(b) + 1) for a, b in zip(in_lo, in_hi, strict=True))
            out_box = tuple(slice(int(a), int(b) + 1) for a, b in zip(out_lo, out_hi, strict=True))
            local_map = voxel_map @ _translation(out_lo)
            local_map[:3, 3] -= in_lo
        score = np.asarray(region_of(in_box), dtype=np.float32)
        if smoothing is not None:
            score = ndimage.gaussian_filter(score, smoothing, mode="constant", cval=cval)
        value = _resample(score, local_map, [s.stop - s.start for s in out_box], order=1, cval=cval)
        if cls == 0 and not residual_background:
            best[out_box] = value
            continue
        if total is not None:
            total[out_box] += value
        region_best = best[out_box]
        region_class = best_class[out_box]
        wins = value > region_best
        region_best[wins] = value[wins]
        region_class[wins] = cls
    if total is not None:
        best_class[1.0 - total >= best] = 0
    return best_class


def _one_hot_scores(classes: np.ndarray) -> Iterator[_Score]:
    """Score sources of the classes 1..max present in an integer class map (background left implicit)."""
    for index, box in enumerate(ndimage.find_objects(classes)):
        if box is not None:
            cls = index + 1
            yield cls, (lambda region, c=cls: classes[region] == c), box, 0.0


def _labels_onto(classes: np.ndarray, voxel_map: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """uint8 class map ``classes`` resampled onto ``out_shape`` by one-hot linear interpolation + argmax.

    Linear interpolation averages a 2-voxel-wide neighbourhood per axis; when an output voxel spans more
    than 2 input voxels, a Gaussian adds the variance still missing to a box of its full width,
    ``(step^2 - 2^2) / 12``, so that every input voxel counts.
    """
    steps = _input_steps(_snap(voxel_map))
    sigma = np.sqrt(np.maximum(0.0, (steps**2 - 4.0) / 12.0))
    return _argmax_resampled(
        _one_hot_scores(classes),
        voxel_map,
        out_shape,
        classes.shape,
        residual_background=True,
        smoothing=sigma if np.any(sigma > 0) else None,
    )


def _canonical_native(transform: NativeTransform) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(canonical voxel -> world affine, canonical shape) of the native reference grid."""
    ornt = orientations.io_orientation(transform.native_affine)
    affine = transform.native_affine @ orientations.inv_ornt_aff(ornt, transform.native_shape)
    shape = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt.astype(int)):
        shape[target] = transform.native_shape[axis]
    return affine, tuple(shape)  # type: ignore[return-value]


def _check_grid_shape(shape: Sequence[int], transform: NativeTransform, what: str) -> None:
    if tuple(shape) != tuple(transform.grid_shape):
        raise ValueError(
            f"{what} has spatial shape {tuple(shape)}, the transform's grid is {transform.grid_shape}"
        )


def labels_to_native(labels: np.ndarray, transform: NativeTransform) -> np.ndarray:
    """Class indices on the grid -> class indices on the native reference grid.

    Args:
        labels: uint8 (X, Y, Z) class indices on ``transform.grid_shape``.

    Returns:
        uint8 ``transform.native_shape`` in the native file's axis order; 0 outside the grid. Exactly
        the grid values wherever the grid and native spacings are equal (pure voxel copy).
    """
    labels = np.asarray(labels)
    _check_grid_shape(labels.shape, transform, "labels")
    if labels.dtype.kind not in "ui":
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    canonical_affine, canonical_shape = _canonical_native(transform)
    voxel_map = np.linalg.inv(transform.grid_affine) @ canonical_affine
    native = _labels_onto(labels.astype(np.uint8, copy=False), voxel_map, canonical_shape)
    return _from_canonical(native, transform.native_affine)


def probabilities_to_native(probs: np.ndarray, transform: NativeTransform) -> np.ndarray:
    """Class probabilities on the grid -> argmax class indices on the native reference grid.

    Each channel is resampled linearly onto the native voxels, then the argmax taken; outside the grid
    the background (class 0) has probability 1.

    Args:
        probs: float (K, X, Y, Z) on ``transform.grid_shape``, channel 0 = background, e.g. a softmax.

    Returns:
        uint8 ``transform.native_shape`` in the native file's axis order.
    """
    probs = np.asarray(probs)
    if probs.ndim != 4 or probs.shape[0] < 1:
        raise ValueError(f"probs must be (K, X, Y, Z), got shape {probs.shape}")
    _check_grid_shape(probs.shape[1:], transform, "probs")
    num_classes = probs.shape[0]
    # Where every channel sums to 1, an interpolated channel that stays below 1/K cannot be the maximum
    # (the interpolated channels still sum to 1), so each channel only needs the box where it reaches 1/K.
    sums_to_one = bool(np.abs(probs.sum(axis=0, dtype=np.float64) - 1.0).max() < 1e-3)

    def scores() -> Iterator[_Score]:
        yield 0, (lambda region: probs[0][region]), None, 1.0
        for cls in range(1, num_classes):
            box = None
            if sums_to_one:
                reach = ndimage.find_objects((probs[cls] >= 1.0 / num_classes - 2e-3).astype(np.uint8))
                if not reach:
                    continue
                box = reach[0]
            yield cls, (lambda region, c=cls: probs[c][region]), box, 0.0

    canonical_affine, canonical_shape = _canonical_native(transform)
    voxel_map = np.linalg.inv(transform.grid_affine) @ canonical_affine
    native = _argmax_resampled(
        scores(), voxel_map, canonical_shape, probs.shape[1:], residual_background=False
    )
    return _from_canonical(native, transform.native_affine)


def native_image(array: np.ndarray, transform: NativeTransform) -> nib.Nifti1Image:
    """A NIfTI image of a native-shaped array (e.g. `labels_to_native` output) with the native affine."""
    array = np.asarray(array)
    if tuple(array.shape[:3]) != tuple(transform.native_shape):
        raise ValueError(f"array has shape {array.shape}, the native grid is {transform.native_shape}")
    image = nib.Nifti1Image(array, transform.native_affine)
    image.set_qform(transform.native_affine, code=1)
    image.set_sform(transform.native_affine, code=1)
    return image


# --- subjects ----------------------------------------------------------------------------------------------


def _load(path: Path, subject_id: str, role: str) -> nib.Nifti1Image:
    try:
        return nib.load(path)  # type: ignore[return-value]
    except FileNotFoundError:
        raise NeurofedError(f"{path}: {role} of {subject_id} not found; run `neurofed-site check`") from None
    except Exception as exc:
        raise NeurofedError(
            f"{path}: cannot read the {role} of {subject_id} as NIfTI ({exc}); re-export the file"
        ) from exc


def _label_classes(label: nib.Nifti1Image, protocol: LabelProtocol, source: str) -> np.ndarray:
    """uint8 protocol classes of a FreeSurfer label map, in the file's axis order."""
    array = np.asanyarray(label.dataobj)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise NeurofedError(f"{source}: label map has shape {array.shape}; it must be one 3-D volume")
    largest = float(array.max()) if array.size else 0.0
    if largest > _MAX_FREESURFER_LABEL:
        # Checked first: the lookup table and the value count below are as long as the largest value.
        raise NeurofedError(
            f"{source}: label value {largest:g} is not a FreeSurfer label (those are below "
            f"{_MAX_FREESURFER_LABEL}); check the label convention with `neurofed-site check`"
        )
    try:
        classes = protocol.map_freesurfer(array)
        values = np.flatnonzero(np.bincount(np.asarray(array, dtype=np.int64).ravel()))
    except ValueError as exc:
        raise NeurofedError(f"{source}: {exc}; a label map holds integer FreeSurfer label values") from None
    unknown = protocol.unknown_values(values)
    if unknown:
        raise NeurofedError(
            f"{source}: label values {unknown[:10]} are not FreeSurfer labels of the {protocol.name!r} "
            "protocol; check the label convention with `neurofed-site check`"
        )
    return classes


def preprocess_subject(
    subject: SubjectFiles, plan: PreprocessingPlan, protocol: LabelProtocol
) -> PreprocessedSubject:
    """Preprocess one subject's images (and label map, if any) onto the plan's grid, for training.

    The label is mapped to ``protocol`` classes, then resampled as one-hot maps + argmax. Raises
    `NeurofedError` naming the file for missing contrasts, unreadable files and foreign label values.
    """
    missing = [c for c in plan.input_contrasts if c not in subject.images]
    if missing:
        raise NeurofedError(
            f"{subject.subject_id}: no {', '.join(missing)} image, which the plan's input contrasts "
            f"{list(plan.input_contrasts)} need; add it or leave this subject out"
        )
    images = [_load(subject.images[c], subject.subject_id, f"{c} image") for c in plan.input_contrasts]
    mask = _load(subject.mask, subject.subject_id, "mask") if subject.mask is not None else None
    image, transform = _grid_image(images, plan, mask)
    label = None
    if subject.label is not None:
        label_image = _load(subject.label, subject.subject_id, "label map")
        classes = _label_classes(label_image, protocol, str(subject.label))
        canonical, canonical_affine = _to_canonical(classes, label_image.affine)
        voxel_map = np.linalg.inv(canonical_affine) @ transform.grid_affine
        label = _labels_onto(canonical, voxel_map, plan.grid_shape)
    return PreprocessedSubject(
        subject_id=subject.subject_id,
        image=image,
        label=label,
        transform=transform,
        plan_fingerprint=plan.fingerprint(),
    )
