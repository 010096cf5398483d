"""`discover_site`: tell the layout of a data folder, discover its subjects, read ``participants.tsv``."""

from __future__ import annotations

import csv
from pathlib import Path

from client.site_layout.bids import _discover_bids
from client.site_layout.common import SiteLayout, _visible_dirs, natural_key
from client.site_layout.flat import _discover_flat
from client.subjects import Problem
from models.errors import NeurofedError

_BIDS_EXAMPLE = (
    "a BIDS dataset (DATA/sub-01/anat/sub-01_T1w.nii.gz, labels in "
    "DATA/derivatives/labels/sub-01/anat/sub-01_dseg.nii.gz)"
)
_FLAT_EXAMPLE = "a flat layout (DATA/images/case01.nii.gz with DATA/labels/case01.nii.gz)"


def discover_site(
    data_dir: Path, derivatives: str | None = None, label_desc: str | None = None
) -> SiteLayout:
    """Find the subjects, their images, labels and masks in ``data_dir`` (see the module docstring).

    Args:
        data_dir: the site's data folder.
        derivatives: BIDS only: of all derivatives pipelines, read labels and masks only from
            ``derivatives/<derivatives>/`` (for sites where several pipelines write a ``*_dseg``);
            files in the raw anat/ folders are still read.
        label_desc: BIDS only: accept only label maps whose ``desc-`` entity is this value (e.g.
            ``aseg`` for ``sub-01_desc-aseg_dseg.nii.gz``).

    Raises:
        NeurofedError: ``data_dir`` does not exist, is not a folder, or holds neither layout.
    """
    root = Path(data_dir)
    if not root.exists():
        raise NeurofedError(
            f"data folder {root} does not exist; pass the folder that holds {_BIDS_EXAMPLE} or {_FLAT_EXAMPLE}"
        )
    if not root.is_dir():
        raise NeurofedError(
            f"data folder {root} is a file, not a folder; pass the folder that holds {_BIDS_EXAMPLE} "
            f"or {_FLAT_EXAMPLE}"
        )
    has_bids = any(_visible_dirs(root, "sub-*"))
    has_flat = (root / "images").is_dir()
    if has_bids:
        layout = _discover_bids(root, derivatives, label_desc)
        if has_flat:
            layout.problems.append(
                Problem(
                    root / "images",
                    "not read: this folder holds a BIDS dataset (sub-*/), so the flat images/ folder is "
                    "ignored; keep the two layouts in separate data folders",
                )
            )
    elif has_flat:
        layout = _discover_flat(root)
    else:
        found = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "") if found else "nothing"
        raise NeurofedError(
            f"data folder {root} holds neither {_BIDS_EXAMPLE} nor {_FLAT_EXAMPLE}; found: {shown}. "
            "Arrange the data in one of these layouts (DATA is the folder you pass)"
        )
    participants_tsv = root / "participants.tsv"
    if participants_tsv.is_file():
        layout.participants = _read_participants(participants_tsv, layout.problems)
    layout.subjects.sort(key=lambda s: natural_key(s.subject_id))
    return layout


def _read_participants(path: Path, problems: list[Problem]) -> dict[str, dict[str, str]]:
    """Rows of a BIDS participants.tsv keyed by participant_id; defects become ``problems``."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(
            Problem(path, f"cannot be read ({exc}); save it as UTF-8 tab-separated text, or remove it")
        )
        return {}
    rows = list(csv.reader(text.splitlines(), delimiter="\t"))
    if not rows or "participant_id" not in rows[0]:
        problems.append(
            Problem(
                path,
                "has no participant_id column in its first line; the first line must be the tab-separated "
                "header, starting with participant_id",
            )
        )
        return {}
    header = rows[0]
    participants: dict[str, dict[str, str]] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            problems.append(
                Problem(
                    path,
                    f"line {line_no} has {len(row)} tab-separated fields but the header has {len(header)}; "
                    "separate columns with one tab each (row ignored)",
                )
            )
            continue
        record = dict(zip(header, row, strict=True))
        pid = record["participant_id"]
        if pid in participants:
            problems.append(Problem(path, f"line {line_no} repeats participant_id {pid} (row ignored)"))
            continue
        participants[pid] = record
    return participants
