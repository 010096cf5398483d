"""The way back: `NativeTransform`, and grid labels / probabilities mapped onto the native voxels.

A `NativeTransform` records where the preprocessed grid sits in world space (mm) relative to the native
reference image, so a prediction made on the grid maps back onto the voxels of the scan it came from.
Voxels of the native image outside the grid are background (class 0).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

from client.preprocessing.geometry import _from_canonical
from client.preprocessing.labels import _argmax_resampled, _labels_onto, _Score
from common.boxes import bounding_box


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
        """JSON-serialisable form (nested lists)."""
        return {
            "native_shape": list(self.native_shape),
            "native_affine": np.asarray(self.native_affine, dtype=float).tolist(),
            "grid_shape": list(self.grid_shape),
            "grid_affine": np.asarray(self.grid_affine, dtype=float).tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> NativeTransform:
        """Inverse of `to_dict`."""
        return cls(
            native_shape=tuple(int(v) for v in d["native_shape"]),  # type: ignore[arg-type]
            native_affine=np.asarray(d["native_affine"], dtype=np.float64).reshape(4, 4),
            grid_shape=tuple(int(v) for v in d["grid_shape"]),  # type: ignore[arg-type]
            grid_affine=np.asarray(d["grid_affine"], dtype=np.float64).reshape(4, 4),
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
    # (the interpolated channels still sum to 1), so each channel only needs the box where it reaches 1/K,
    # and the background only the boxes of the others: outside them no other class is scored, and
    # background (class 0) is what the output holds where nothing else wins.
    sums_to_one = bool(np.abs(probs.sum(axis=0, dtype=np.float64) - 1.0).max() < 1e-3)
    boxes: dict[int, tuple[slice, ...] | None] = dict.fromkeys(range(1, num_classes))  # None: everywhere
    background_box = None
    if sums_to_one:
        reached = {
            cls: ndimage.find_objects((probs[cls] >= 1.0 / num_classes - 2e-3).astype(np.uint8))
            for cls in range(1, num_classes)
        }
        boxes = {cls: reach[0] for cls, reach in reached.items() if reach}
        if not boxes:  # no class but the background reaches 1/K anywhere: all background
            return np.zeros(transform.native_shape, dtype=np.uint8)
        background_box = bounding_box(boxes.values(), probs.shape[1:])

    def scores() -> Iterator[_Score]:
        yield 0, (lambda region: probs[0][region]), background_box, 1.0
        for cls, box in boxes.items():
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
