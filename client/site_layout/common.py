"""What discovery returns (`SiteLayout`), and the file-name and folder-listing helpers both layouts use.

Listings skip hidden entries (``.name``, including macOS ``._name`` resource forks) and come in natural
order (``sub-2`` before ``sub-10``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from client.subjects import Problem, SubjectFiles


@dataclass
class SiteLayout:
    """What discovery found in a site's data folder.

    Attributes:
        root: the data folder, as given.
        kind: ``"bids"`` or ``"flat"``.
        subjects: one entry per subject (per subject and session in BIDS), in natural order of id.
        participants: rows of ``participants.tsv`` (all columns, as strings) keyed by participant_id;
            empty when the file is absent or unreadable.
        problems: every file found that cannot be attached to exactly one subject (a label with no
            image, two candidate labels for one subject, a second T1w, a non-NIfTI file in images/),
            and an unreadable participants.tsv.
        subject_problems: the subset of ``problems`` that makes one subject unusable (two candidate
            labels or masks: one problem, path None, naming all candidates relative to ``root``), keyed
            by subject id; such a subject has ``label``/``mask`` None.
    """

    root: Path
    kind: Literal["bids", "flat"]
    subjects: list[SubjectFiles]
    participants: dict[str, dict[str, str]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    subject_problems: dict[str, list[Problem]] = field(default_factory=dict)

    def layout_only_problems(self) -> list[Problem]:
        """``problems`` not tied to one subject (those are shown with the subject instead)."""
        tied = {id(p) for ps in self.subject_problems.values() for p in ps}
        return [p for p in self.problems if id(p) not in tied]


def nifti_stem(path: Path) -> str | None:
    """The file name without ``.nii``/``.nii.gz`` (any case), or None when it is not a NIfTI name."""
    name = path.name
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return name[: -len(".nii.gz")]
    if lower.endswith(".nii"):
        return name[: -len(".nii")]
    return None


def natural_key(text: str) -> list[int | str]:
    """Sort key that orders ``sub-2`` before ``sub-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _visible_dirs(folder: Path, pattern: str) -> list[Path]:
    """Non-hidden subfolders of ``folder`` matching the glob ``pattern``, in natural order."""
    return sorted(
        (p for p in folder.glob(pattern) if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: natural_key(p.name),
    )


def _visible_files(folder: Path) -> list[Path]:
    """Non-hidden files directly in ``folder`` (none if it is missing), in natural order."""
    if not folder.is_dir():
        return []
    # "._name" files are macOS resource forks, not images
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
        key=lambda p: natural_key(p.name),
    )


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` for messages, or whole when it lies outside."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
