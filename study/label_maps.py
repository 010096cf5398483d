"""FreeSurfer label maps: finding them in a folder, loading and validating them.

Synthesis (study/synthesis.py) deforms these into subjects' anatomy; a map must be a 3D volume of
FreeSurfer label values (models/label_protocols.py), checked here with errors that name the file.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from models.errors import NeurofedError
from models.label_protocols import TISSUE


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


def check_label_map_header(path: Path) -> None:
    """Fail before anything is written when a label map is unreadable or not 3D (header only)."""
    try:
        shape = nib.load(path).shape
    except Exception as exc:  # nibabel raises many types for a broken or foreign file
        raise NeurofedError(f"{path}: cannot read as NIfTI ({exc}); replace or remove the file") from exc
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
        raise NeurofedError(f"{path}: label map must be a 3D volume, got shape {shape}; give 3D label maps")


def as_label_array(label_map: np.ndarray) -> np.ndarray:
    """A 3D label map as int16 (float values rounded); raises ValueError when it is not 3D."""
    labels = np.asarray(label_map)
    if labels.ndim != 3:
        raise ValueError(f"label map must be 3D, got shape {labels.shape}")
    if labels.dtype == np.int16:
        return labels
    if labels.dtype.kind == "f":
        labels = np.rint(labels)
    return labels.astype(np.int16)
