"""Intensities: the head mask (FSL BET's threshold) and per-contrast clipping + normalisation.

Step 4 of the pipeline (see `client.preprocessing`): each contrast is clipped to the plan's percentiles
inside a mask, then z-scored inside it (or only clipped, ``normalization="none"``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from client.preprocessing.plan import PreprocessingPlan
from models.errors import NeurofedError


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
    """One contrast clipped to the plan's percentiles inside ``mask``, then normalised inside it.

    Args:
        channel: float32 (X, Y, Z) intensities on the grid.
        mask: bool (X, Y, Z), not empty: the brain mask, else the head mask.
        source: the file name for error messages.
    """
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
