"""The preprocessing plan: the data that decides how a scan becomes the network's input.

A `PreprocessingPlan` (nnU-Net's "plan") names the input contrasts, the target voxel spacing (mm), the field
of view (mm), intensity clipping and normalisation. It is shared by all sites of a federation, and its
`PreprocessingPlan.fingerprint` tags every array made with it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

from models.errors import NeurofedError

NORMALIZATIONS: tuple[str, ...] = ("zscore", "none")
"""``zscore``: clip, then zero mean / unit variance inside the mask. ``none``: clip only."""


def _as_float_triple(value: Sequence[float], name: str) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise NeurofedError(f"preprocessing plan: {name} must be three numbers (mm), got {value!r}") from None
    if len(triple) != 3 or not all(math.isfinite(v) and v > 0 for v in triple):
        raise NeurofedError(f"preprocessing plan: {name} must be three positive numbers (mm), got {value!r}")
    return triple  # type: ignore[return-value]


@dataclass(frozen=True)
class PreprocessingPlan:
    """How a site turns a scan into the network's input. Shared by all sites of a federation.

    Attributes:
        input_contrasts: BIDS suffixes of the images stacked as input channels, in channel order; the
            first one is the reference grid that predictions map back onto.
        target_spacing_mm: voxel size of the grid along the canonical (R, A, S) voxel axes, in mm.
        field_of_view_mm: extent of the grid in mm, RAS axis order. The default (192, 224, 192) holds a
            whole adult head and most of the skull (left-right, anterior-posterior, inferior-superior);
            on 15 real 1 mm whole-head label maps at most 0.22% of the tissue classes (lower brain-stem
            and spinal CSF in scans that include the neck) falls outside it.
        clip_percentiles: lower and upper intensity percentiles (0-100) inside the mask to clip to.
        normalization: one of `NORMALIZATIONS`, computed inside the subject's brain mask when it has
            one, else inside the head mask (`head_mask` of the reference image).
        image_interpolation: spline order for images (0 nearest, 1 linear, 3 cubic; 0-5).
        crop_neck_first: when the head is taller than the field of view, keep the vertex and cut inferiorly.
    """

    input_contrasts: tuple[str, ...] = ("T1w",)
    target_spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    field_of_view_mm: tuple[float, float, float] = (192.0, 224.0, 192.0)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    normalization: str = "zscore"
    image_interpolation: int = 1
    crop_neck_first: bool = True

    def __post_init__(self) -> None:
        # Coerce JSON lists and ints so that equal plans have equal fingerprints.
        contrasts = (
            (self.input_contrasts,) if isinstance(self.input_contrasts, str) else tuple(self.input_contrasts)
        )
        if not contrasts or not all(isinstance(c, str) and c for c in contrasts):
            raise NeurofedError(
                f"preprocessing plan: input_contrasts must name at least one contrast (e.g. ['T1w']), got "
                f"{self.input_contrasts!r}"
            )
        if len(set(contrasts)) != len(contrasts):
            raise NeurofedError(
                f"preprocessing plan: input_contrasts lists a contrast twice: {list(contrasts)}"
            )
        object.__setattr__(self, "input_contrasts", contrasts)
        spacing = _as_float_triple(self.target_spacing_mm, "target_spacing_mm")
        fov = _as_float_triple(self.field_of_view_mm, "field_of_view_mm")
        object.__setattr__(self, "target_spacing_mm", spacing)
        object.__setattr__(self, "field_of_view_mm", fov)
        if any(f < s for f, s in zip(fov, spacing, strict=True)):
            raise NeurofedError(
                f"preprocessing plan: field_of_view_mm {list(fov)} is smaller than one voxel of "
                f"target_spacing_mm {list(spacing)}; give the field of view in mm, not voxels"
            )
        try:
            lo, hi = (float(p) for p in self.clip_percentiles)
        except (TypeError, ValueError):
            raise NeurofedError(
                f"preprocessing plan: clip_percentiles must be two numbers, got {self.clip_percentiles!r}"
            ) from None
        if not 0.0 <= lo < hi <= 100.0:
            raise NeurofedError(
                f"preprocessing plan: clip_percentiles must satisfy 0 <= low < high <= 100, got {[lo, hi]}"
            )
        object.__setattr__(self, "clip_percentiles", (lo, hi))
        if self.normalization not in NORMALIZATIONS:
            raise NeurofedError(
                f"preprocessing plan: normalization {self.normalization!r} is not one of "
                f"{list(NORMALIZATIONS)}"
            )
        if isinstance(self.image_interpolation, bool) or self.image_interpolation not in range(6):
            raise NeurofedError(
                f"preprocessing plan: image_interpolation must be a spline order 0-5, got "
                f"{self.image_interpolation!r}"
            )
        if not isinstance(self.crop_neck_first, bool):
            raise NeurofedError(
                f"preprocessing plan: crop_neck_first must be true or false, got {self.crop_neck_first!r}"
            )

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Voxels of the grid along (R, A, S): field of view / spacing, rounded."""
        return tuple(  # type: ignore[return-value]
            max(1, round(f / s)) for f, s in zip(self.field_of_view_mm, self.target_spacing_mm, strict=True)
        )

    def to_dict(self) -> dict:
        """JSON-serialisable form (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> PreprocessingPlan:
        """Inverse of `to_dict`. Missing keys take their defaults; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NeurofedError(
                f"preprocessing plan: unknown field(s) {unknown}; known fields are {sorted(known)} "
                "(was the plan written by a newer neurofed?)"
            )
        return cls(**dict(d))

    def fingerprint(self) -> str:
        """Stable 16-hex-digit hash of the plan: equal for equal plans, across processes and machines."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]
