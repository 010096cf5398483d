"""Scores on each scan's own voxel grid: what a site's ``neurofed segment`` output of that scan scores.

The study's main scores (study/study_evaluation.py) are on the run's working grid (e.g. 2 mm). A site's
label map is not: ``neurofed segment`` maps the grid probabilities onto the scan's own voxels before the
argmax and the post-processing (`client.segmentation.native_segmentation`), and the reference is the scan's
own label map, at its own resolution (e.g. 1 mm). This module scores that, and the partial-volume ceiling of
the working grid: the subject's own label map taken onto the grid as the sites' preprocessing takes it and
mapped back, the score of a segmentation that is perfect on the grid.

The unseen sites' subjects are scored this way (the figure a new hospital sees), every model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from contract.evaluation import result_record
from models.errors import NeurofedError

if TYPE_CHECKING:
    from client.preprocessing import NativeTransform
    from models.label_protocols import LabelProtocol


@dataclass(frozen=True)
class NativeReference:
    """A subject's reference on its scan's own grid.

    Attributes:
        labels: uint8 class indices of the protocol, shape and axis order of the scan's label file.
        spacing_mm: the label file's voxel size (mm), in the same axis order.
        transform: where the working grid sits on that scan.
    """

    labels: np.ndarray
    spacing_mm: tuple[float, float, float]
    transform: NativeTransform


def load_native_reference(
    label_file: Path, transform: NativeTransform, protocol: LabelProtocol
) -> NativeReference:
    """The subject's label map (FreeSurfer values) as ``protocol`` classes on its own grid.

    Raises:
        NeurofedError: naming the file, when it cannot be read or holds no label map of the protocol.
    """
    import nibabel as nib

    try:
        image = nib.load(label_file)
        labels = protocol.map_freesurfer(np.asanyarray(image.dataobj))
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as error:
        raise NeurofedError(
            f"cannot score on the scan's own grid: label map {label_file} is unreadable ({error}); "
            f"run `neurofed-site check {label_file.parent}` to see why"
        ) from error
    if tuple(labels.shape) != tuple(transform.native_shape):
        raise NeurofedError(
            f"cannot score on the scan's own grid: label map {label_file} has shape {labels.shape}, its scan "
            f"{tuple(transform.native_shape)}; the label map must be on the scan's voxel grid"
        )
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return NativeReference(labels, spacing, transform)  # type: ignore[arg-type]


def _scores(prediction: np.ndarray, reference: NativeReference, class_names: Sequence[str]):
    from models.metrics import segmentation_metrics

    return segmentation_metrics(prediction, reference.labels, class_names, reference.spacing_mm)


def native_scores(
    probabilities: np.ndarray,
    reference: NativeReference,
    class_names: Sequence[str],
    postprocessing: str,
) -> dict[str, dict[str, float]]:
    """``{class: {metric: value}}`` of a model's ``(K, X, Y, Z)`` grid probabilities, segmented as a site's
    ``neurofed segment`` does and scored against the scan's own label map (HD95 / ASSD in mm there)."""
    from client.segmentation import native_segmentation

    labels = native_segmentation(probabilities, reference.transform, len(class_names), postprocessing)
    return _scores(labels, reference, class_names)


def ceiling_scores(
    grid_label: np.ndarray, reference: NativeReference, class_names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """``{class: {metric: value}}`` of the subject's own grid label (a perfect segmentation on the working
    grid) mapped onto its scan: the partial-volume ceiling of the working resolution."""
    from client.preprocessing import labels_to_native

    return _scores(labels_to_native(grid_label, reference.transform), reference, class_names)


def native_record(
    scores: dict[str, dict[str, float]], reference: NativeReference, **identity: Any
) -> dict[str, Any]:
    """An evaluation.json record of native-grid ``scores`` (`contract.evaluation.result_record`) with the
    scan's voxel size."""
    return {**result_record(scores, **identity), "spacing_mm": list(reference.spacing_mm)}
