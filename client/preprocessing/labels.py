"""Label maps: FreeSurfer values -> protocol classes, and class maps resampled by one-hot interpolation.

A class map is resampled as one score map per class, each interpolated linearly, followed by an argmax
(`_argmax_resampled`); this keeps thin structures such as cortex that nearest-neighbour interpolation
erodes. The same machinery maps labels onto the grid (`_labels_onto`) and back onto the native voxels
(`client.preprocessing.inverse`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from client.preprocessing.geometry import _input_steps, _is_diagonal, _resample, _snap, _translation
from common.ordered_work import in_order, usable_cores
from models.errors import NeurofedError
from models.label_protocols import LabelProtocol

_MAX_FREESURFER_LABEL = 1 << 16
"""Label values at or above this are no FreeSurfer labels (the lookup table stops at 14175)."""


_Score = tuple[int, Callable[[tuple[slice, ...]], np.ndarray], tuple[slice, ...] | None, float]
"""(class, input region -> score map there, box outside which the class cannot win or None, value outside)."""


RESAMPLING_THREADS = usable_cores(4)
"""Classes resampled at once (SciPy's interpolation releases the GIL): at most this many score maps are in
memory, and a class map at 1 mm maps about this many times faster."""


def _argmax_resampled(
    scores: Iterable[_Score],
    voxel_map: np.ndarray,
    out_shape: Sequence[int],
    input_shape: Sequence[int],
    residual_background: bool,
    smoothing: np.ndarray | None = None,
) -> np.ndarray:
    """Argmax over classes of per-class score maps, each resampled linearly onto ``out_shape``; uint8.

    Classes are streamed (`RESAMPLING_THREADS` score maps in memory at a time), each only over the output
    voxels whose interpolation stencil reaches its box. Classes must come in increasing order; ties go to
    the lower class, as ``np.argmax``.

    Args:
        voxel_map: (4, 4) output voxel -> input voxel.
        residual_background: class 0 is not among ``scores`` and is 1 - the sum of the others (one-hot
            inputs, whose linear interpolation keeps that sum at 1). Otherwise class 0 comes first, whole.
        smoothing: Gaussian sigma (input voxels) per input axis applied before resampling, or None.
    """
    voxel_map = _snap(voxel_map)
    out_shape = tuple(int(n) for n in out_shape)
    best = np.zeros(out_shape, dtype=np.float32)
    best_class = np.zeros(out_shape, dtype=np.uint8)
    total = np.zeros(out_shape, dtype=np.float32) if residual_background else None

    def resample(score: _Score) -> tuple[int, tuple[slice, ...], np.ndarray] | None:
        return _resample_class(score, voxel_map, out_shape, input_shape, smoothing)

    for resampled in in_order(resample, scores, RESAMPLING_THREADS):
        if resampled is None:
            continue
        cls, out_box, value = resampled
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


def _resample_class(
    score: _Score,
    voxel_map: np.ndarray,
    out_shape: tuple[int, ...],
    input_shape: Sequence[int],
    smoothing: np.ndarray | None,
) -> tuple[int, tuple[slice, ...], np.ndarray] | None:
    """(class, output box, its score there) of one class of `_argmax_resampled`; None where it reaches no
    output voxel."""
    cls, region_of, box, cval = score
    in_box = tuple(slice(0, int(n)) for n in input_shape)
    out_box = tuple(slice(0, n) for n in out_shape)
    local_map = voxel_map
    if box is not None and _is_diagonal(voxel_map):
        margin = 1 + (0 if smoothing is None else int(np.ceil(4 * float(np.max(smoothing)))))
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
            return None
        in_box = tuple(slice(int(a), int(b) + 1) for a, b in zip(in_lo, in_hi, strict=True))
        out_box = tuple(slice(int(a), int(b) + 1) for a, b in zip(out_lo, out_hi, strict=True))
        local_map = voxel_map @ _translation(out_lo)
        local_map[:3, 3] -= in_lo
    values = np.asarray(region_of(in_box), dtype=np.float32)
    if smoothing is not None:
        values = ndimage.gaussian_filter(values, smoothing, mode="constant", cval=cval)
    return cls, out_box, _resample(values, local_map, [s.stop - s.start for s in out_box], order=1, cval=cval)


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
