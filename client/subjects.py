"""What a site holds: subjects, their files, and the outcome of checking them.

These types are shared by discovery (site_layout), validation, preprocessing and the site CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

STRUCTURAL_CONTRASTS: tuple[str, ...] = ("T1w", "T2w", "FLAIR", "PDw")
SESSION_SEPARATOR = "_ses-"
"""What joins a BIDS subject and its session in a subject id (``sub-01_ses-pre``)."""


def person_of(subject_id: str) -> str:
    """The person a subject id belongs to: ``"sub-01"`` for ``"sub-01_ses-pre"`` and for ``"sub-01"``.

    The privacy unit is the person: all sessions of one person fall in one split and are sampled
    together in DP-SGD, so a person with many sessions gets the ε of one unit, not of each session.
    """
    return subject_id.split(SESSION_SEPARATOR, 1)[0]
"""BIDS suffixes of the structural images a site may hold; a plan names which it feeds the network."""


@dataclass(frozen=True)
class SubjectFiles:
    """The files of one subject (one session, if the site has sessions).

    Attributes:
        subject_id: ``"sub-01"``, or ``"sub-01_ses-pre"`` when the subject has sessions.
        images: BIDS contrast suffix (``"T1w"``, ``"T2w"``, ...) -> image file.
        label: the ``*_dseg`` label map (FreeSurfer values), or None for unlabelled subjects.
        mask: the ``*_mask`` brain/head mask, or None.
    """

    subject_id: str
    images: dict[str, Path]
    label: Path | None = None
    mask: Path | None = None

    def all_files(self) -> list[Path]:
        files = [self.images[c] for c in sorted(self.images)]
        files += [p for p in (self.label, self.mask) if p is not None]
        return files


@dataclass(frozen=True)
class Problem:
    """One reason a subject cannot be used: the offending file and what is wrong with it."""

    path: Path | None
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path is not None else self.reason


@dataclass
class SubjectCheck:
    """The outcome of validating one subject. ``usable`` is False when any problem was found."""

    subject_id: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.problems
