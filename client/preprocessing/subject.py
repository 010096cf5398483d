"""One subject, for training: its images and label map loaded and put onto the plan's grid.

`preprocess_subject` is the entry point the site's data pipeline calls; it returns a `PreprocessedSubject`
holding the normalised image channels, the label classes on the same grid, and the transform back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from client.preprocessing.geometry import _to_canonical
from client.preprocessing.inverse import NativeTransform
from client.preprocessing.labels import _label_classes, _labels_onto
from client.preprocessing.plan import PreprocessingPlan
from client.preprocessing.volume import _grid_image
from client.subjects import SubjectFiles
from models.errors import NeurofedError
from models.label_protocols import LabelProtocol


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


def _load(path: Path, subject_id: str, role: str) -> nib.Nifti1Image:
    """The NIfTI image at ``path`` (lazily loaded); `NeurofedError` naming the file and role otherwise."""
    try:
        return nib.load(path)  # type: ignore[return-value]
    except FileNotFoundError:
        raise NeurofedError(f"{path}: {role} of {subject_id} not found; run `neurofed-site check`") from None
    except Exception as exc:
        raise NeurofedError(
            f"{path}: cannot read the {role} of {subject_id} as NIfTI ({exc}); re-export the file"
        ) from exc


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
    label_image = _load(subject.label, subject.subject_id, "label map") if subject.label is not None else None
    return preprocess_images(subject.subject_id, images, plan, protocol, label=label_image, mask=mask)


def preprocess_images(
    subject_id: str,
    images: list[nib.Nifti1Image],
    plan: PreprocessingPlan,
    protocol: LabelProtocol,
    *,
    label: nib.Nifti1Image | None = None,
    mask: nib.Nifti1Image | None = None,
) -> PreprocessedSubject:
    """`preprocess_subject` for images already loaded (or made in memory, as study/ synthesis does).

    Args:
        images: one image per plan contrast, in the plan's order (the first is the reference grid).
        label: FreeSurfer label map on any grid overlapping the images, or None.
        mask: brain mask to normalise inside, or None for the reference image's head mask.
    """
    image, transform = _grid_image(images, plan, mask)
    classes_on_grid = None
    if label is not None:
        classes = _label_classes(label, protocol, label.get_filename() or f"<{subject_id} label map>")
        canonical, canonical_affine = _to_canonical(classes, label.affine)
        voxel_map = np.linalg.inv(canonical_affine) @ transform.grid_affine
        classes_on_grid = _labels_onto(canonical, voxel_map, plan.grid_shape)
    return PreprocessedSubject(
        subject_id=subject_id,
        image=image,
        label=classes_on_grid,
        transform=transform,
        plan_fingerprint=plan.fingerprint(),
    )
