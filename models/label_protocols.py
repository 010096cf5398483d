"""Label protocols: how FreeSurfer labels map to the classes a network predicts.

A protocol is data, not code: a name, the ordered class names, and for each class the FreeSurfer
label values that belong to it. Every FreeSurfer value not listed, and all non-brain head tissue
(values >= 500), is background (class 0). Sites, models and reports all refer to a protocol by name,
so a model trained on one protocol cannot silently be scored against another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

NON_BRAIN_LABEL_MIN = 500
"""FreeSurfer / SynthSeg values >= 500 are non-brain head tissue: skull, scalp, eyes, soft tissue."""
NON_BRAIN_LABEL_MAX = 599

KNOWN_SMALL_STRUCTURES: frozenset[int] = frozenset(
    # lesion, vessel, choroid plexus, WM hypointensities, non-WM hypointensities, optic chiasm,
    # and SynthSeg's extra-cerebral labels: real label maps contain them, protocols may ignore them.
    {25, 30, 31, 57, 62, 63, 72, 77, 80, 85, 136, 137, 163, 164}
)


@dataclass(frozen=True)
class LabelProtocol:
    """An ordered set of segmentation classes defined over FreeSurfer label values.

    Attributes:
        name: identifier stored in model files and run configs (``"tissue"``, ``"aseg"``).
        class_names: class index -> human-readable name; index 0 is always background.
        members: class index -> FreeSurfer label values mapped to that class (background implied).
    """

    name: str
    class_names: tuple[str, ...]
    members: Mapping[int, tuple[int, ...]] = field(repr=False)

    def __post_init__(self) -> None:
        if self.class_names[0] != "background":
            raise ValueError(f"protocol {self.name!r}: class 0 must be 'background'")
        seen: dict[int, int] = {}
        for cls, values in self.members.items():
            if not 1 <= cls < len(self.class_names):
                raise ValueError(f"protocol {self.name!r}: class index {cls} out of range")
            for v in values:
                if v in seen:
                    raise ValueError(f"protocol {self.name!r}: label {v} in classes {seen[v]} and {cls}")
                seen[v] = cls

    def accepted_values(self) -> frozenset[int]:
        """FreeSurfer values a label map for this protocol may contain.

        Class members, air (0), known small structures and non-brain head tissue (500-599). Any other
        value means the label map follows another convention (e.g. already class indices of another
        protocol) and must not be silently mapped to background.
        """
        members = {v for values in self.members.values() for v in values}
        return frozenset(members | {0} | KNOWN_SMALL_STRUCTURES | set(range(NON_BRAIN_LABEL_MIN, NON_BRAIN_LABEL_MAX + 1)))

    def unknown_values(self, values: np.ndarray) -> list[int]:
        """The values among ``values`` (e.g. ``np.unique(label_map)``) this protocol does not accept."""
        accepted = self.accepted_values()
        return sorted(int(v) for v in np.asarray(values).ravel() if int(v) not in accepted)

    @property
    def num_classes(self) -> int:
        """Number of output channels, background included."""
        return len(self.class_names)

    def lookup_table(self, max_label: int) -> np.ndarray:
        """Array ``lut`` of length ``max_label + 1`` with ``lut[freesurfer_value] = class index``."""
        lut = np.zeros(max_label + 1, dtype=np.uint8)
        for cls, values in self.members.items():
            for v in values:
                if v <= max_label:
                    lut[v] = cls
        return lut

    def map_freesurfer(self, labels: np.ndarray) -> np.ndarray:
        """Map an integer FreeSurfer label map of any shape to class indices (uint8, same shape).

        Raises:
            ValueError: for negative or non-integer values, which no FreeSurfer map contains.
        """
        arr = np.asarray(labels)
        if arr.dtype.kind == "f":
            rounded = np.rint(arr)
            if not np.array_equal(rounded, arr):
                raise ValueError("label map has non-integer values")
            arr = rounded
        arr = arr.astype(np.int64, copy=False)
        if arr.size and arr.min() < 0:
            raise ValueError(f"label map has negative value {int(arr.min())}")
        max_label = int(arr.max()) if arr.size else 0
        return self.lookup_table(max_label)[arr]

    def to_dict(self) -> dict:
        """JSON-serialisable form, stored in model files and run outputs."""
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "members": {str(k): list(v) for k, v in self.members.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> LabelProtocol:
        return cls(
            name=d["name"],
            class_names=tuple(d["class_names"]),
            members={int(k): tuple(v) for k, v in d["members"].items()},
        )


# Tissue classes as in MRBrainS: ventricles count as CSF, deep grey as grey matter, cerebellar
# white matter, brain-stem and ventral DC as white matter.
TISSUE = LabelProtocol(
    name="tissue",
    class_names=("background", "csf", "grey_matter", "white_matter"),
    members={
        1: (4, 5, 14, 15, 24, 43, 44, 72),
        2: (3, 8, 10, 11, 12, 13, 17, 18, 26, 42, 47, 49, 50, 51, 52, 53, 54, 58),
        3: (2, 7, 16, 28, 41, 46, 60, 85),
    },
)

# The FreeSurfer aseg structures: one class per structure and hemisphere. Small structures (vessels,
# choroid plexus, optic chiasm, lesions) are background, as in SynthSeg's evaluation.
_ASEG_STRUCTURES: tuple[tuple[str, int], ...] = (
    ("left_cerebral_white_matter", 2),
    ("left_cerebral_cortex", 3),
    ("left_lateral_ventricle", 4),
    ("left_inferior_lateral_ventricle", 5),
    ("left_cerebellum_white_matter", 7),
    ("left_cerebellum_cortex", 8),
    ("left_thalamus", 10),
    ("left_caudate", 11),
    ("left_putamen", 12),
    ("left_pallidum", 13),
    ("third_ventricle", 14),
    ("fourth_ventricle", 15),
    ("brain_stem", 16),
    ("left_hippocampus", 17),
    ("left_amygdala", 18),
    ("csf", 24),
    ("left_accumbens", 26),
    ("left_ventral_dc", 28),
    ("right_cerebral_white_matter", 41),
    ("right_cerebral_cortex", 42),
    ("right_lateral_ventricle", 43),
    ("right_inferior_lateral_ventricle", 44),
    ("right_cerebellum_white_matter", 46),
    ("right_cerebellum_cortex", 47),
    ("right_thalamus", 49),
    ("right_caudate", 50),
    ("right_putamen", 51),
    ("right_pallidum", 52),
    ("right_hippocampus", 53),
    ("right_amygdala", 54),
    ("right_accumbens", 58),
    ("right_ventral_dc", 60),
)
ASEG = LabelProtocol(
    name="aseg",
    class_names=("background",) + tuple(name for name, _ in _ASEG_STRUCTURES),
    members={i + 1: (value,) for i, (_, value) in enumerate(_ASEG_STRUCTURES)},
)

PROTOCOLS: dict[str, LabelProtocol] = {p.name: p for p in (TISSUE, ASEG)}


def get_protocol(name: str) -> LabelProtocol:
    """The protocol called ``name``; a ``KeyError`` names the known protocols."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise KeyError(f"unknown label protocol {name!r}; known: {', '.join(sorted(PROTOCOLS))}") from None
