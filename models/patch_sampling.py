"""Class-balanced patch sampling from preprocessed subjects.

A subject is an image ``(C, X, Y, Z)`` float32 (z-scored) and a label ``(X, Y, Z)`` integer class indices
on the same voxel grid. A share of patches is centred on a voxel of a foreground class chosen uniformly
among the classes the subject contains (so small structures are seen as often as large ones), the rest
are placed uniformly. Patches always lie fully inside the (padded) volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_LOCATIONS_PER_CLASS = 10_000
"""Voxels remembered per class for centring patches: enough to cover a structure, bounded memory."""


def check_subject(image: np.ndarray, label: np.ndarray, index: int) -> None:
    """Raise ValueError unless ``image`` is ``(C, X, Y, Z)`` float and ``label`` ``(X, Y, Z)`` integer, same grid."""
    if image.ndim != 4 or label.ndim != 3 or image.shape[1:] != label.shape:
        raise ValueError(
            f"subject {index}: expected image (C, X, Y, Z) and label (X, Y, Z) on the same grid, "
            f"got image {image.shape} and label {label.shape}"
        )
    if image.dtype.kind != "f" or label.dtype.kind not in "iu":
        raise ValueError(
            f"subject {index}: image must be float and label integer, got {image.dtype}, {label.dtype}"
        )


def padding_to(shape: Sequence[int], size: Sequence[int]) -> list[tuple[int, int]]:
    """Per axis ``(before, after)`` voxels that pad ``shape`` symmetrically to at least ``size``."""
    widths = [max(0, int(p) - int(s)) for p, s in zip(size, shape, strict=True)]
    return [(w // 2, w - w // 2) for w in widths]


def pad_image(image: np.ndarray, pads: Sequence[tuple[int, int]]) -> np.ndarray:
    """Pad the spatial axes of ``image`` ``(C, X, Y, Z)``, each channel with its minimum intensity.

    The minimum is the background of a z-scored MRI, so padding looks like air to the network, in
    training and inference alike.
    """
    if not any(before or after for before, after in pads):
        return image
    return np.stack(
        [np.pad(channel, pads, mode="constant", constant_values=channel.min()) for channel in image]
    )


def pad_to_patch(
    image: np.ndarray, label: np.ndarray, patch_size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Pad a subject symmetrically so every side is at least ``patch_size``; no copy when already large enough.

    The image is padded by ``pad_image``, the label with class 0 (background).
    """
    pads = padding_to(label.shape, patch_size)
    if not any(before or after for before, after in pads):
        return image, label
    return pad_image(image, pads), np.pad(label, pads, mode="constant", constant_values=0)


def class_locations(
    label: np.ndarray, rng: np.random.Generator, max_per_class: int = MAX_LOCATIONS_PER_CLASS
) -> dict[int, np.ndarray]:
    """Foreground class -> up to ``max_per_class`` flat voxel indices (int64) of that class, drawn by ``rng``.

    Classes absent from ``label`` have no entry; background (0) is never included.
    """
    flat = label.ravel()
    present = [int(c) for c in np.flatnonzero(np.bincount(flat)) if c != 0]
    locations = {}
    for cls in present:
        where = np.flatnonzero(flat == cls)
        if where.size > max_per_class:
            where = np.sort(rng.choice(where, size=max_per_class, replace=False))
        locations[cls] = where
    return locations


def choose_patch_start(
    shape: Sequence[int],
    patch_size: Sequence[int],
    rng: np.random.Generator,
    *,
    locations: dict[int, np.ndarray] | None = None,
    foreground_share: float = 0.0,
) -> tuple[int, int, int]:
    """Corner of a patch of ``patch_size`` inside a volume of ``shape`` (both in voxels, ``shape >= patch_size``).

    With probability ``foreground_share`` (and when ``locations`` has any class) the patch is centred on
    a random voxel of a foreground class chosen uniformly among those present, shifted as little as
    needed to lie inside the volume; otherwise its corner is uniform over all valid corners.
    """
    limits = [int(s) - int(p) for s, p in zip(shape, patch_size, strict=True)]
    if min(limits) < 0:
        raise ValueError(f"volume {tuple(shape)} is smaller than patch {tuple(patch_size)}; pad it first")
    # Always draw the same number of values so the sequence of draws does not depend on the branch taken.
    wants_foreground = rng.random() < foreground_share
    class_draw, voxel_draw = rng.random(), rng.random()
    corner = [int(rng.integers(0, limit + 1)) for limit in limits]
    if wants_foreground and locations:
        classes = sorted(locations)
        voxels = locations[classes[int(class_draw * len(classes))]]
        centre = np.unravel_index(voxels[int(voxel_draw * len(voxels))], tuple(shape))
        corner = [
            min(max(int(c) - int(p) // 2, 0), limit)
            for c, p, limit in zip(centre, patch_size, limits, strict=True)
        ]
    return corner[0], corner[1], corner[2]


def crop_patch(
    image: np.ndarray, label: np.ndarray, start: Sequence[int], patch_size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The views ``image[:, start:start+patch]`` ``(C, *patch)`` and ``label[start:start+patch]`` ``(*patch)``."""
    region = tuple(slice(int(s), int(s) + int(p)) for s, p in zip(start, patch_size, strict=True))
    return image[(slice(None), *region)], label[region]
