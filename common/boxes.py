"""Bounding boxes of voxel arrays as `scipy.ndimage.find_objects` gives them: one slice per axis."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Box = tuple[slice, ...]


def bounding_box(boxes: Iterable[Box | None], shape: Sequence[int], margin: int = 0) -> Box | None:
    """The smallest box holding every box of ``boxes`` (None entries skipped, as `find_objects` gives
    absent labels), grown by ``margin`` voxels on each side within an array of ``shape``; None when there
    is no box."""
    given = [box for box in boxes if box is not None]
    if not given:
        return None
    return tuple(
        slice(
            max(min(box[d].start for box in given) - margin, 0),
            min(max(box[d].stop for box in given) + margin, n),
        )
        for d, n in enumerate(shape)
    )
