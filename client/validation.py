"""Check one subject's files before anything reads them for training or inference.

``validate_subject`` turns every defect into a ``Problem`` that names the file, what is wrong and what
to do; it never raises for bad data, never writes, and reads each file once. ``load_checked_volume``
is the loader it uses, for reuse where a file must be read with the same guarantees.

Grids must agree to within ``AFFINE_TOLERANCE_MM`` (1e-3 mm) on the affine's translation and
``AFFINE_TOLERANCE_LINEAR`` (1e-4) on each entry of its rotation/zoom part, so that a label lies voxel
for voxel on its image; voxel sizes must lie in (``MIN_VOXEL_MM``, ``MAX_VOXEL_MM``] = (0.2, 8] mm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nibabel.filebasedimages import ImageFileError

from client.subjects import Problem, SubjectCheck, SubjectFiles
from models.errors import NeurofedError
from models.label_protocols import LabelProtocol

AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference (mm) between two files' affine translations that still counts as the same grid."""
AFFINE_TOLERANCE_LINEAR = 1e-4
"""Largest difference between entries of two files' 3x3 rotation/zoom parts for the same grid."""
MIN_VOXEL_MM = 0.2
"""Voxel sizes at or below this (mm) are header errors: no clinical MRI is that fine."""
MAX_VOXEL_MM = 8.0
"""Voxel sizes above this (mm) are header errors or scouts, useless for segmentation."""
MAX_ANISOTROPY = 3.0
"""Largest/smallest voxel size above which a warning says thick slices will cost accuracy."""
MAX_LISTED_VALUES = 5
"""How many offending values a message lists."""
_UINT16_RANGE = 1 << 16  # label values below this are counted with bincount, far faster than np.unique


class VolumeError(NeurofedError):
    """A NIfTI file that cannot be used as a 3D volume; ``reason`` says why and what to do."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


NIFTI1_HEADER_BYTES = 348


def _short_header(path: Path) -> int | None:
    """The (decompressed) size of a NIfTI file cut short before the end of its header, else None."""
    import gzip

    try:
        if path.read_bytes()[:2] == b"\x1f\x8b":
            with gzip.open(path) as f:
                data = f.read(NIFTI1_HEADER_BYTES)
        else:
            data = path.read_bytes()[:NIFTI1_HEADER_BYTES]
    except (OSError, EOFError):
        return None
    # A NIfTI header starts with its own size (348, or 540 for NIfTI-2), in either byte order.
    starts_as_nifti = len(data) >= 4 and {int.from_bytes(data[:4], order) for order in ("little", "big")} & {348, 540}
    return len(data) if starts_as_nifti and len(data) < NIFTI1_HEADER_BYTES else None


def load_checked_volume(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Read a NIfTI file completely and return its image and its 3D voxel array.

    The whole data block is read (nibabel reads only the header on load, so a truncated or corrupt
    file would otherwise pass). A 4D file with exactly one volume is accepted and squeezed.

    Returns:
        ``(image, data)``: the nibabel image (header and affine; its own data is not touched again) and
        ``data``, shape ``(X, Y, Z)`` in the file's voxel order, numeric dtype as stored after the
        header's scaling (float for scaled or float files, else the stored integer type).

    Raises:
        VolumeError: the file is unreadable, not NIfTI, truncated or corrupt, not one 3D volume, or
            holds non-numeric voxels (RGB, complex).
    """
    path = Path(path)
    try:
        image = nib.load(path, mmap=False)
    except FileNotFoundError:
        raise VolumeError(path, "file not found; it was moved or deleted while being checked") from None
    except ImageFileError as exc:
        if (size := _short_header(path)) is not None:
            raise VolumeError(
                path,
                f"truncated: it holds {size} bytes{' (decompressed)' if path.suffix == '.gz' else ''}, fewer "
                f"than a NIfTI header's {NIFTI1_HEADER_BYTES}; the copy was cut short: copy it again from "
                "its source",
            ) from None
        raise VolumeError(
            path, f"not a NIfTI file ({exc}); convert it to NIfTI-1 (.nii or .nii.gz)"
        ) from None
    except Exception as exc:
        raise VolumeError(
            path, f"cannot be read ({type(exc).__name__}: {exc}); check permissions or copy the file again"
        ) from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise VolumeError(
            path, f"is a {type(image).__name__}, not NIfTI; convert it to NIfTI-1 (.nii or .nii.gz)"
        )
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise VolumeError(
            path, f"is not a 3D volume (shape {shape}); export the whole scan as one 3D NIfTI volume"
        )
    if len(shape) > 3 and any(n != 1 for n in shape[3:]):
        volumes = int(np.prod(shape[3:]))
        raise VolumeError(
            path,
            f"holds {volumes} volumes (shape {shape}), not one 3D volume; extract the structural volume "
            "(e.g. fslroi, or nibabel's image.slicer[..., 0]) into a file of its own",
        )
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as exc:
        raise VolumeError(
            path,
            f"data cannot be read: the file is truncated or corrupt ({type(exc).__name__}: {exc}); "
            "copy or export it again",
        ) from None
    if data.dtype.kind not in "biuf":
        raise VolumeError(
            path, f"voxel type {data.dtype} is not a plain number (RGB or complex); export it as grey values"
        )
    return image, data.reshape(shape[:3])


def geometry_defects(affine: np.ndarray) -> list[str]:
    """Why a voxel-to-world ``affine`` (4x4, mm) cannot be used; empty when it is fine."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        return ["voxel-to-world affine has non-finite entries; fix the header's sform/qform"]
    zooms = voxel_sizes(affine)
    if np.any(zooms <= MIN_VOXEL_MM) or np.any(zooms > MAX_VOXEL_MM):
        return [
            f"implausible voxel size {_fmt_zooms(zooms)} mm (each must be > {MIN_VOXEL_MM} and <= "
            f"{MAX_VOXEL_MM} mm); the header's pixdim/sform is probably wrong: fix it at export"
        ]
    if abs(np.linalg.det(affine[:3, :3])) <= 1e-6 * float(np.prod(zooms)):
        return [
            "voxel-to-world affine is not invertible (its axes are parallel); fix the header's sform/qform"
        ]
    return []


def validate_subject(
    subject: SubjectFiles, protocol: LabelProtocol, contrast: str = "T1w", require_label: bool = True
) -> SubjectCheck:
    """Check every file of ``subject``; never raises for bad data and never writes.

    Problems (the subject is unusable) concern the ``contrast`` image, the label and the mask:
    missing files, unreadable/corrupt/non-NIfTI files, not one 3D volume, implausible voxel sizes or a
    singular affine, grids that differ from the ``contrast`` image (shape, or affine beyond
    ``AFFINE_TOLERANCE_MM``/``AFFINE_TOLERANCE_LINEAR``), NaN/Inf voxels, a constant image, label values
    that are not integers or that ``protocol`` does not accept, a label without any ``protocol`` class,
    a mask that is empty or not 0/1. The same defects in the subject's other contrasts, which the
    network does not read, and oddities such as anisotropic voxels are warnings.
    """
    check = SubjectCheck(subject.subject_id)
    required = _Findings(check, blocking=True)
    optional = _Findings(check, blocking=False, note=f" (a warning only: the network reads {contrast})")

    reference: _Grid | None = None
    if contrast not in subject.images:
        others = ", ".join(f"{c} ({p.name})" for c, p in sorted(subject.images.items()))
        required.add(
            None,
            f"no {contrast} image for {subject.subject_id}"
            + (f"; it has {others}" if others else "")
            + f"; add its {contrast} image, or choose a contrast every subject has (--contrast)",
        )
    else:
        reference = _check_file(
            subject.images[contrast], f"{contrast} image", "image", protocol, required, None
        )
    for other in sorted(c for c in subject.images if c != contrast):
        _check_file(subject.images[other], f"{other} image", "image", protocol, optional, reference)

    if subject.label is not None:
        label_grid = _check_file(subject.label, "label map", "label", protocol, required, reference)
        # Without a readable image, mask and label must still agree with each other.
        reference = reference or label_grid
    elif require_label:
        required.add(
            None,
            f"no label map (*_dseg.nii[.gz], or labels/ in a flat layout) for {subject.subject_id}; add one, "
            "or accept unlabelled subjects (--unlabelled-ok) if the site only runs inference",
        )
    if subject.mask is not None:
        _check_file(subject.mask, "mask", "mask", protocol, required, reference)
    return check


# -------------------------------------------------------------------------------------------- internals


@dataclass
class _Findings:
    """Where a file's defects go: problems (blocking) or warnings naming the file."""

    check: SubjectCheck
    blocking: bool
    note: str = ""

    def add(self, path: Path | None, reason: str) -> None:
        if self.blocking:
            self.check.problems.append(Problem(path, reason))
        else:
            self.check.warnings.append(f"{path.name if path else ''}: {reason}{self.note}")

    def warn(self, path: Path, text: str) -> None:
        self.check.warnings.append(f"{path.name}: {text}")


@dataclass(frozen=True)
class _Grid:
    """A checked file's voxel grid: shape ``(X, Y, Z)`` and voxel-to-world affine (4x4, mm)."""

    path: Path
    name: str
    shape: tuple[int, ...]
    affine: np.ndarray


def _check_file(
    path: Path,
    name: str,
    role: str,
    protocol: LabelProtocol,
    findings: _Findings,
    reference: _Grid | None,
) -> _Grid | None:
    """Read ``path`` once, record its defects in ``findings``, return its grid if it could be read."""
    try:
        image, data = load_checked_volume(path)
    except VolumeError as exc:
        findings.add(path, exc.reason)
        return None
    except Exception as exc:  # a file must never stop the check of the others
        findings.add(path, f"could not be checked ({type(exc).__name__}: {exc}); copy or export it again")
        return None
    try:
        grid = _Grid(path, name, data.shape, image.affine.astype(np.float64))
        for reason in geometry_defects(grid.affine):
            findings.add(path, reason)
        _warn_oddities(image, grid, role, findings)
        if reference is not None:
            for reason in _grid_mismatches(grid, reference, role):
                findings.add(path, reason)
        if role == "image":
            defects = _image_defects(data)
        elif role == "label":
            defects = _label_defects(data, protocol)
        else:
            defects = _mask_defects(data)
        for reason in defects:
            findings.add(path, reason)
        return grid
    except Exception as exc:
        findings.add(path, f"could not be checked ({type(exc).__name__}: {exc}); copy or export it again")
        return None


def _warn_oddities(image: nib.Nifti1Image, grid: _Grid, role: str, findings: _Findings) -> None:
    zooms = voxel_sizes(grid.affine)
    # Labels and masks share their image's voxels; one warning, on the image, is enough.
    anisotropic = (
        np.all(np.isfinite(zooms)) and zooms.min() > 0 and zooms.max() / zooms.min() > MAX_ANISOTROPY
    )
    if role == "image" and anisotropic:
        findings.warn(
            grid.path,
            f"anisotropic voxels {_fmt_zooms(zooms)} mm (ratio {zooms.max() / zooms.min():.1f}:1 > "
            f"{MAX_ANISOTROPY:g}:1); thick slices lower segmentation accuracy",
        )
    header = image.header
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        findings.warn(
            grid.path,
            "header has no orientation (sform and qform codes are 0); left and right may be guessed",
        )


def _grid_mismatches(grid: _Grid, reference: _Grid, role: str) -> list[str]:
    interpolation = "nearest-neighbour" if role in ("label", "mask") else "trilinear"
    fix = f"resample it onto the {reference.name}'s grid ({interpolation} interpolation)"
    reasons = []
    if grid.shape != reference.shape:
        reasons.append(
            f"shape {grid.shape} differs from the {reference.name}'s {reference.shape} "
            f"({reference.path.name}); {fix}"
        )
    translation = float(np.max(np.abs(grid.affine[:3, 3] - reference.affine[:3, 3])))
    linear = float(np.max(np.abs(grid.affine[:3, :3] - reference.affine[:3, :3])))
    if translation > AFFINE_TOLERANCE_MM or linear > AFFINE_TOLERANCE_LINEAR:
        reasons.append(
            f"voxel-to-world affine differs from the {reference.name}'s ({reference.path.name}) by "
            f"{translation:.3g} mm in translation and {linear:.3g} in rotation/zoom (tolerance "
            f"{AFFINE_TOLERANCE_MM:g} mm and {AFFINE_TOLERANCE_LINEAR:g}), so voxels do not line up; {fix}"
        )
    return reasons


def _nonfinite_defects(data: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Reasons for NaN/Inf voxels, and the finite voxel values (flat) for the checks that follow."""
    if data.dtype.kind != "f":
        return [], data.ravel()
    finite = np.isfinite(data)
    if finite.all():
        return [], data.ravel()
    reasons = []
    n_nan = int(np.count_nonzero(np.isnan(data)))
    n_inf = int(data.size - np.count_nonzero(finite) - n_nan)
    for count, what in ((n_nan, "NaN"), (n_inf, "infinite")):
        if count:
            reasons.append(
                f"{count} of {data.size} voxels are {what}; re-export the file (a failed conversion or "
                "division by zero writes these)"
            )
    return reasons, data[finite]


def _image_defects(data: np.ndarray) -> list[str]:
    reasons, values = _nonfinite_defects(data)
    if values.size == 0:
        return reasons
    low, high = values.min(), values.max()
    if low == high:
        reasons.append(f"every voxel has the value {low:g}: the image is blank; export the scan again")
    return reasons


def _label_defects(data: np.ndarray, protocol: LabelProtocol) -> list[str]:
    reasons, values = _nonfinite_defects(data)
    if values.size == 0:
        return reasons
    if values.dtype.kind == "f":
        fractional = values != np.rint(values)
        if fractional.any():
            examples = ", ".join(f"{v:g}" for v in np.unique(values[fractional])[:MAX_LISTED_VALUES])
            reasons.append(
                f"{int(np.count_nonzero(fractional))} voxels have non-integer label values (e.g. {examples}); "
                "label maps hold FreeSurfer label numbers: resample labels with nearest-neighbour "
                "interpolation, never linear"
            )
            return reasons
    present = _present_values(values)
    unknown = protocol.unknown_values(present)
    if unknown:
        listed = ", ".join(str(v) for v in unknown[:MAX_LISTED_VALUES])
        more = f" and {len(unknown) - MAX_LISTED_VALUES} more" if len(unknown) > MAX_LISTED_VALUES else ""
        reasons.append(
            f"label values {listed}{more} are not FreeSurfer labels the {protocol.name!r} protocol accepts; "
            "the label map must hold FreeSurfer label numbers (e.g. 2/41 white matter, 3/42 cortex), "
            "not class indices or another lookup table: convert it, or choose its protocol (--protocol)"
        )
    members = {v for vs in protocol.members.values() for v in vs}
    if not members.intersection(int(v) for v in present):
        reasons.append(
            f"no voxel belongs to any {protocol.name!r} class ({', '.join(protocol.class_names[1:])}): "
            f"the label map is empty (values present: {', '.join(str(v) for v in present[:MAX_LISTED_VALUES])}); "
            "is it the right file?"
        )
    return reasons


def _mask_defects(data: np.ndarray) -> list[str]:
    reasons, values = _nonfinite_defects(data)
    if values.size == 0:
        return reasons
    rounded = np.rint(values) if values.dtype.kind == "f" else values
    present = np.unique(rounded)
    odd = [v for v in present.tolist() if v not in (0, 1)]
    if odd:
        listed = ", ".join(f"{v:g}" for v in odd[:MAX_LISTED_VALUES])
        reasons.append(
            f"mask values must be 0 or 1, found {listed}; save the mask as 0 (outside) / 1 (inside)"
        )
    elif not np.any(present == 1):
        reasons.append("mask is empty (no voxel is 1); export the brain mask again, or leave it out")
    return reasons


def _present_values(values: np.ndarray) -> np.ndarray:
    """Sorted distinct integer values of an integer-valued array (any shape), as int64."""
    values = values.astype(np.int64, copy=False)
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high < _UINT16_RANGE:
        return np.flatnonzero(np.bincount(values.ravel(), minlength=high + 1)).astype(np.int64)
    return np.unique(values).astype(np.int64)


def _fmt_zooms(zooms: np.ndarray) -> str:
    return " x ".join(f"{z:.3g}" for z in zooms)
