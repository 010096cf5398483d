"""Post-processing of predicted label maps: connected-component clean-up, as data-named modes.

A network that scores each voxel on its own can label a few voxels far from the brain (in the neck, in
the eyes) as tissue. Dice barely notices them; HD95 does, since it is set by the farthest 5 % of the
boundary. The modes below remove such islands with MONAI's ``KeepLargestConnectedComponent`` and fill
the brain's enclosed holes with the nearest class. Whether a mode helps is measured on held-out anatomy
(bench/bench_postprocessing.py, BENCHMARKS.md "Post-processing"); the run setting ``postprocessing``
chooses one and the model file records it, so every path that turns probabilities into labels (the
sites' evaluation, the study's report, ``neurofed-site segment``) applies the same one
(`predicted_labels`, `postprocess_labels`).

The functions work on any voxel grid (the preprocessed grid or a scan's native one); connectivity is
counted in voxels, so it does not depend on the spacing.
"""

from __future__ import annotations

import numpy as np

from common.boxes import bounding_box
from models.errors import NeurofedError

NO_POSTPROCESSING = "none"
"""The argmax of the probabilities, unchanged."""
LARGEST_BRAIN = "largest-brain"
"""Keep the largest connected component of all foreground classes together (the brain); every other
island becomes background; background enclosed by the brain takes the class of the nearest brain voxel."""
LARGEST_PER_CLASS = "largest-per-class"
"""`LARGEST_BRAIN`, then keep only the largest connected component of each class; the voxels a class loses
take the class of the nearest voxel kept (they lie inside the brain)."""
POSTPROCESSING_MODES: tuple[str, ...] = (NO_POSTPROCESSING, LARGEST_BRAIN, LARGEST_PER_CLASS)

CONNECTIVITY = 3
"""Voxels touching by a face, an edge or a corner are connected (MONAI/scikit-image ``connectivity`` 3 in
3D): thin structures such as cortex stay in one piece at 2 mm."""


def check_postprocessing(mode: str, where: str = "post-processing") -> str:
    """``mode`` if it is one of `POSTPROCESSING_MODES`; NeurofedError naming ``where`` and the choices if not."""
    if mode not in POSTPROCESSING_MODES:
        raise NeurofedError(f"{where} {mode!r} is unknown; choose one of {', '.join(POSTPROCESSING_MODES)}")
    return mode


def postprocess_labels(labels: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
    """Apply post-processing ``mode`` to a label map.

    Args:
        labels: ``(X, Y, Z)`` integer class indices, 0 the background.
        num_classes: classes of the label protocol, background included.
        mode: one of `POSTPROCESSING_MODES`.

    Returns:
        ``(X, Y, Z)`` uint8 class indices on the same grid; voxels removed from a class become background
        unless a hole filled by one class encloses them.
    """
    check_postprocessing(mode)
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (X, Y, Z), got shape {labels.shape}")
    out = labels.astype(np.uint8)
    foreground = tuple(range(1, num_classes))
    if mode == NO_POSTPROCESSING or not foreground or not out.any():
        return out
    from scipy import ndimage

    # Everything below happens inside the labelled voxels' bounding box, grown by a voxel of background:
    # outside it all is background and stays so, and inside it the components, the holes (background cut
    # off from the box's edge, which touches the volume's outside) and the nearest classes are those of
    # the whole volume. On a 1 mm scan the brain's box is a small part of it.
    box = bounding_box(ndimage.find_objects((out > 0).astype(np.uint8)), out.shape, margin=1)
    result = np.zeros_like(out)
    result[box] = _postprocess_box(out[box], foreground, mode)
    return result


def _postprocess_box(out: np.ndarray, foreground: tuple[int, ...], mode: str) -> np.ndarray:
    """`postprocess_labels` of a non-empty uint8 label map whose edge voxels are background or the volume's."""
    from monai.transforms import KeepLargestConnectedComponent
    from scipy import ndimage

    def largest(independent: bool, classes: np.ndarray) -> np.ndarray:
        keep = KeepLargestConnectedComponent(
            foreground, is_onehot=False, independent=independent, connectivity=CONNECTIVITY
        )
        # A copy: MONAI edits a NumPy input in place, and the caller compares before with after.
        return np.asarray(keep(classes[None].copy()))[0]

    out = largest(False, out)
    # MONAI's FillHoles fills whatever a class encloses, other classes included (white matter would take
    # the ventricles), so holes are found on the brain as a whole and given their nearest class.
    unlabelled = ndimage.binary_fill_holes(out > 0) & (out == 0)
    if mode == LARGEST_PER_CLASS:
        kept = largest(True, out)
        unlabelled |= (kept == 0) & (out > 0)
        out = kept
    return _nearest_class(out, unlabelled)


def _nearest_class(labels: np.ndarray, unlabelled: np.ndarray) -> np.ndarray:
    """``labels`` with every ``unlabelled`` voxel given the class of the nearest labelled (> 0) voxel."""
    from scipy import ndimage

    if not unlabelled.any() or not (labels > 0).any():
        return labels
    # Only the brain's bounding box can hold an unlabelled voxel or its nearest class: work inside it.
    box = ndimage.find_objects(((labels > 0) | unlabelled).astype(np.uint8))[0]
    inside, todo = labels[box], unlabelled[box]
    nearest = ndimage.distance_transform_edt(inside == 0, return_distances=False, return_indices=True)
    filled = inside.copy()
    filled[todo] = inside[tuple(index[todo] for index in nearest)]
    out = labels.copy()
    out[box] = filled
    return out


def predicted_labels(probabilities: np.ndarray, mode: str) -> np.ndarray:
    """Class map of class probabilities: the argmax per voxel, then `postprocess_labels` with ``mode``.

    Args:
        probabilities: ``(K, X, Y, Z)`` class probabilities (or logits), K classes with 0 the background.
        mode: one of `POSTPROCESSING_MODES`.

    Returns:
        ``(X, Y, Z)`` uint8 class indices.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 4:
        raise ValueError(f"probabilities must be (K, X, Y, Z), got shape {probabilities.shape}")
    return postprocess_labels(probabilities.argmax(axis=0), probabilities.shape[0], mode)
