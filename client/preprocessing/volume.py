"""Images onto the grid: the whole pipeline for one scan (one or several co-registered contrasts).

The first image is the reference: it is reoriented, resampled onto the plan's lattice, and its head mask
places the field-of-view window. The other contrasts are resampled straight onto that window. Each
channel is then normalised inside the brain mask (when given) or the head mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np

from client.preprocessing.geometry import (
    _anti_alias,
    _crop_or_pad,
    _input_steps,
    _lattice,
    _resample,
    _to_canonical,
    _translation,
    _window_start,
)
from client.preprocessing.intensity import _normalize, head_mask
from client.preprocessing.inverse import NativeTransform
from client.preprocessing.plan import PreprocessingPlan
from models.errors import NeurofedError


def _image_array(image: nib.Nifti1Image, source: str) -> np.ndarray:
    """float32 (I, J, K) voxels of a 3-D image (or a 4-D one with one volume), all finite."""
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
    """The image's file name for error messages, ``fallback`` for an in-memory image."""
    name = image.get_filename()
    return str(name) if name else fallback


def _grid_image(
    images: Sequence[nib.Nifti1Image], plan: PreprocessingPlan, mask: nib.Nifti1Image | None
) -> tuple[np.ndarray, NativeTransform]:
    """``images`` (one per plan contrast, the first the reference) on the plan's grid.

    Returns:
        float32 (C, X, Y, Z) normalised channels, and the transform back to the reference's voxels.
    """
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
