"""Find the subjects in a site's data folder: a BIDS dataset or a flat images/labels folder.

Discovery only looks at names and folders; it opens no image (that is validation's job) and never
modifies anything. Files it finds but cannot attach to exactly one subject become ``Problem``s.

BIDS (https://bids-specification.readthedocs.io)::

    DATA/participants.tsv                                        optional
    DATA/sub-01/[ses-pre/]anat/sub-01_[ses-pre_][acq-x_][run-1_]T1w.nii.gz   T1w, T2w, FLAIR, PDw
    DATA/sub-01/[ses-pre/]anat/sub-01_[...]_mask.nii.gz          optional mask
    DATA/derivatives/<name>/sub-01/[ses-pre/]anat/sub-01_[...]_dseg.nii.gz   label map
    DATA/derivatives/<name>/sub-01/[ses-pre/]anat/sub-01_desc-brain_mask.nii.gz  optional mask

A ``*_dseg`` beside the image in anat/ is a candidate label too. Labels and masks attach to the
subject and session of their folder, and only to images whose shared entities (acq-, run-, ...) agree.

Flat::

    DATA/images/case01.nii.gz        (or case01_T1w.nii.gz, case01_FLAIR.nii.gz, ...)
    DATA/labels/case01.nii.gz        (or case01_dseg / _seg / _label / _labels.nii.gz)
    DATA/masks/case01.nii.gz         optional (or case01_mask / _brainmask / _desc-brain_mask.nii.gz)
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from client.subjects import STRUCTURAL_CONTRASTS, Problem, SubjectFiles
from models.errors import NeurofedError

NATIVE_SPACES: frozenset[str] = frozenset({"orig", "native", "individual", "T1w", *STRUCTURAL_CONTRASTS})
"""``space-`` values of a BIDS derivative that lie on the subject's own image grid. A derivative in any
other space (``space-MNI152NLin2009cAsym``) is a template-space copy and is not a candidate label/mask."""

FLAT_LABEL_SUFFIXES: tuple[str, ...] = ("", "_dseg", "_seg", "_label", "_labels")
"""Endings a flat-layout label name may add to its image's (or subject's) name."""
FLAT_MASK_SUFFIXES: tuple[str, ...] = ("", "_mask", "_brainmask", "_brain_mask", "_desc-brain_mask")
"""Endings a flat-layout mask name may add to its image's (or subject's) name."""

_BIDS_EXAMPLE = (
    "a BIDS dataset (DATA/sub-01/anat/sub-01_T1w.nii.gz, labels in "
    "DATA/derivatives/labels/sub-01/anat/sub-01_dseg.nii.gz)"
)
_FLAT_EXAMPLE = "a flat layout (DATA/images/case01.nii.gz with DATA/labels/case01.nii.gz)"


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


# ---------------------------------------------------------------------------------------------- names


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


@dataclass(frozen=True)
class BidsName:
    """A BIDS file name split into its entities (``{"sub": "01", "acq": "x"}``) and suffix (``T1w``)."""

    entities: dict[str, str]
    suffix: str


def parse_bids_name(stem: str) -> BidsName | None:
    """Split ``sub-01_ses-pre_run-1_T1w`` into entities and suffix; None if it is not a BIDS name."""
    *pairs, suffix = stem.split("_")
    entities: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep or not key or not value or key in entities:
            return None
        entities[key] = value
    if "sub" not in entities or not suffix:
        return None
    return BidsName(entities, suffix)


def _visible_dirs(folder: Path, pattern: str) -> list[Path]:
    return sorted(
        (p for p in folder.glob(pattern) if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: natural_key(p.name),
    )


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    # "._name" files are macOS resource forks, not images
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
        key=lambda p: natural_key(p.name),
    )


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------- BIDS

_Key = tuple[str, str | None]  # (sub-01, ses-pre | None)


@dataclass(frozen=True)
class _Found:
    path: Path
    entities: dict[str, str]


def _subject_id(key: _Key) -> str:
    sub, ses = key
    return f"{sub}_{ses}" if ses else sub


def _folder_of(key: _Key) -> str:
    sub, ses = key
    return f"{sub}/{ses}/anat/" if ses else f"{sub}/anat/"


def _name_matches_folder(name: BidsName, key: _Key) -> bool:
    sub, ses = key
    if f"sub-{name.entities['sub']}" != sub:
        return False
    return "ses" not in name.entities or f"ses-{name.entities['ses']}" == ses


def _in_native_space(name: BidsName) -> bool:
    return name.entities.get("space", "orig") in NATIVE_SPACES


def _compatible(a: dict[str, str], b: dict[str, str]) -> bool:
    """True when every entity the two names share has the same value (``run-1`` never meets ``run-2``)."""
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def _discover_bids(root: Path, derivatives: str | None, label_desc: str | None) -> SiteLayout:
    problems: list[Problem] = []
    keys: list[_Key] = []
    images: dict[_Key, dict[str, list[_Found]]] = defaultdict(lambda: defaultdict(list))
    unrecognised: dict[_Key, list[Path]] = defaultdict(list)
    labels: dict[_Key, list[_Found]] = defaultdict(list)
    masks: dict[_Key, list[_Found]] = defaultdict(list)

    for sub_dir in _visible_dirs(root, "sub-*"):
        sessions = _visible_dirs(sub_dir, "ses-*")
        anat_dirs: list[tuple[_Key, Path]] = [((sub_dir.name, s.name), s / "anat") for s in sessions]
        if not sessions or (sub_dir / "anat").is_dir():
            anat_dirs.insert(0, ((sub_dir.name, None), sub_dir / "anat"))
        for key, anat in anat_dirs:
            keys.append(key)
            for path, name in _bids_niftis(anat, key, root, problems):
                if name is None or name.suffix not in (*STRUCTURAL_CONTRASTS, "dseg", "mask"):
                    unrecognised[key].append(path)
                elif name.suffix in STRUCTURAL_CONTRASTS:
                    images[key][name.suffix].append(_Found(path, name.entities))
                elif not _in_native_space(name):
                    continue
                elif name.suffix == "dseg":
                    labels[key].append(_Found(path, name.entities))
                else:
                    masks[key].append(_Found(path, name.entities))

    deriv_root = root / "derivatives"
    pipelines = _visible_dirs(deriv_root, "*") if deriv_root.is_dir() else []
    if derivatives is not None:
        if derivatives not in {p.name for p in pipelines}:
            known = ", ".join(p.name for p in pipelines) or "none"
            raise NeurofedError(
                f"{deriv_root / derivatives} does not exist (derivatives pipelines found: {known}); "
                "pass one of these names, or leave the option out to search all of them"
            )
        pipelines = [deriv_root / derivatives]
    for pipeline in pipelines:
        for sub_dir in _visible_dirs(pipeline, "sub-*"):
            anat_dirs = [((sub_dir.name, None), sub_dir / "anat")]
            anat_dirs += [((sub_dir.name, s.name), s / "anat") for s in _visible_dirs(sub_dir, "ses-*")]
            for key, anat in anat_dirs:
                for path, name in _bids_niftis(anat, key, root, problems):
                    if name is None or name.suffix not in ("dseg", "mask"):
                        continue
                    if not _in_native_space(name):
                        continue
                    found = _Found(path, name.entities)
                    (labels if name.suffix == "dseg" else masks)[key].append(found)

    if label_desc is not None:
        for key, found in labels.items():
            labels[key] = [f for f in found if f.entities.get("desc") == label_desc]

    subjects: list[SubjectFiles] = []
    subject_problems: dict[str, list[Problem]] = {}
    known_keys = set(keys)
    orphans = sorted(
        (
            (key, kind, found.path)
            for kind, by_key in (("label", labels), ("mask", masks))
            for key, founds in by_key.items()
            if key not in known_keys
            for found in founds
        ),
        key=lambda orphan: natural_key(str(orphan[2])),
    )
    for key, kind, path in orphans:
        problems.append(
            Problem(
                path,
                f"{kind} with no image: the dataset has no {_folder_of(key)} for it, so it is not used; "
                f"add the subject's images under {_folder_of(key)} if it belongs to this site",
            )
        )

    for key in keys:
        sid = _subject_id(key)
        chosen: dict[str, _Found] = {}
        for contrast in STRUCTURAL_CONTRASTS:
            candidates = sorted(images[key].get(contrast, []), key=lambda f: natural_key(f.path.name))
            if not candidates:
                continue
            chosen[contrast] = candidates[0]
            for extra in candidates[1:]:
                problems.append(
                    Problem(
                        extra.path,
                        f"not used: {sid} has several {contrast} images and neurofed reads one per subject "
                        f"and session; using {candidates[0].path.name}",
                    )
                )
        if not chosen:
            for path in unrecognised.get(key, []):
                problems.append(
                    Problem(
                        path,
                        f"not recognised as a structural image: {sid} has no file ending in "
                        f"{', '.join('_' + c for c in STRUCTURAL_CONTRASTS)}.nii[.gz]; rename it following "
                        f"BIDS, e.g. {sid}_T1w.nii.gz",
                    )
                )
        tied: list[Problem] = []
        label = _pick_one(sid, "label map", labels.get(key, []), chosen, root, problems, tied)
        mask = _pick_one(sid, "mask", masks.get(key, []), chosen, root, problems, tied)
        if tied:
            subject_problems[sid] = tied
        subjects.append(SubjectFiles(sid, {c: f.path for c, f in chosen.items()}, label=label, mask=mask))
    return SiteLayout(root, "bids", subjects, problems=problems, subject_problems=subject_problems)


def _bids_niftis(
    anat: Path, key: _Key, root: Path, problems: list[Problem]
) -> Iterable[tuple[Path, BidsName | None]]:
    """NIfTI files in ``anat`` with their parsed names; files named for another subject become problems."""
    for path in _visible_files(anat):
        stem = nifti_stem(path)
        if stem is None:
            continue  # JSON sidecars and the like
        name = parse_bids_name(stem)
        if name is not None and not _name_matches_folder(name, key):
            problems.append(
                Problem(
                    path,
                    f"file name names another subject or session than its folder {_rel(anat, root)}/; "
                    "rename the file or move it to the matching folder",
                )
            )
            continue
        yield path, name


def _pick_one(
    sid: str,
    kind: str,
    candidates: list[_Found],
    images: dict[str, _Found],
    root: Path,
    problems: list[Problem],
    tied: list[Problem],
) -> Path | None:
    """The single label/mask among ``candidates`` that fits ``images``; problems for the rest."""
    fitting = candidates
    if images:
        fitting = [c for c in candidates if any(_compatible(c.entities, i.entities) for i in images.values())]
        image_names = ", ".join(i.path.name for i in images.values())
        for c in candidates:
            if c not in fitting:
                problems.append(
                    Problem(
                        c.path,
                        f"not used: its entities do not match any image of {sid} ({image_names}); "
                        "give it the same acq-/run-/rec- entities as the image it belongs to",
                    )
                )
    if len(fitting) == 1:
        return fitting[0].path
    if len(fitting) > 1:
        names = ", ".join(_rel(c.path, root) for c in fitting)
        hint = "--derivatives NAME to read one derivatives/ pipeline"
        if kind == "label map":
            hint += " or --label-desc DESC to pick by the desc- entity"
        # One problem for the one defect; it names every candidate file.
        problem = Problem(
            None,
            f"{sid} has {len(fitting)} candidate {kind}s ({names}) and neurofed cannot tell which to "
            f"use; pass {hint}",
        )
        problems.append(problem)
        tied.append(problem)
    return None


# ----------------------------------------------------------------------------------------------- flat


def _split_flat_image(stem: str) -> tuple[str, str]:
    """``case01_FLAIR`` -> (``case01``, ``FLAIR``); names without a BIDS contrast suffix are T1w."""
    for contrast in STRUCTURAL_CONTRASTS:
        if stem.endswith("_" + contrast) and len(stem) > len(contrast) + 1:
            return stem[: -len(contrast) - 1], contrast
    return stem, "T1w"


def _flat_niftis(folder: Path, problems: list[Problem]) -> list[tuple[Path, str]]:
    found = []
    for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)) if folder.is_dir() else []:
        if path.name.startswith("."):
            continue
        stem = nifti_stem(path)
        if path.is_dir():
            problems.append(
                Problem(
                    path, f"not read: subfolders of {folder.name}/ are ignored; put the files in it directly"
                )
            )
        elif stem is None:
            problems.append(
                Problem(
                    path,
                    "not a NIfTI file name (.nii or .nii.gz); convert it to NIfTI (e.g. dcm2niix for DICOM, "
                    "mri_convert for .mgz) or move it out of the data folder",
                )
            )
        else:
            found.append((path, stem))
    return found


def _discover_flat(root: Path) -> SiteLayout:
    problems: list[Problem] = []
    images: dict[str, dict[str, Path]] = defaultdict(dict)
    image_stems: dict[str, set[str]] = defaultdict(set)
    for path, stem in _flat_niftis(root / "images", problems):
        sid, contrast = _split_flat_image(stem)
        if contrast in images[sid]:
            problems.append(
                Problem(
                    path,
                    f"not used: {sid} already has a {contrast} image ({images[sid][contrast].name}); "
                    "keep one file per subject and contrast in images/",
                )
            )
            continue
        images[sid][contrast] = path
        image_stems[sid].add(stem)

    def match(folder: str, suffixes: tuple[str, ...], kind: str) -> dict[str, list[Path]]:
        owner: dict[str, str] = {}
        for sid, stems in image_stems.items():
            for base in stems | {sid}:
                for suffix in suffixes:
                    owner.setdefault(base + suffix, sid)
        matched: dict[str, list[Path]] = defaultdict(list)
        for path, stem in _flat_niftis(root / folder, problems):
            sid = owner.get(stem)
            if sid is None:
                problems.append(
                    Problem(
                        path,
                        f"{kind} with no image: images/ has no {stem}.nii[.gz]; name the {kind} like its "
                        f"image (images/case01.nii.gz -> {folder}/case01.nii.gz or "
                        f"case01{suffixes[1]}.nii.gz)",
                    )
                )
            else:
                matched[sid].append(path)
        return matched

    labels = match("labels", FLAT_LABEL_SUFFIXES, "label")
    masks = match("masks", FLAT_MASK_SUFFIXES, "mask")
    subjects = []
    subject_problems: dict[str, list[Problem]] = {}
    for sid, contrasts in images.items():
        picked: dict[str, Path | None] = {}
        for kind, found in (("label", labels.get(sid, [])), ("mask", masks.get(sid, []))):
            picked[kind] = found[0] if len(found) == 1 else None
            if len(found) > 1:
                names = ", ".join(_rel(p, root) for p in found)
                problem = Problem(
                    None,
                    f"{sid} has {len(found)} candidate {kind}s ({names}) and neurofed cannot tell which "
                    f"to use; keep one {kind} per subject in {kind}s/",
                )
                problems.append(problem)
                subject_problems.setdefault(sid, []).append(problem)
        subjects.append(SubjectFiles(sid, dict(contrasts), label=picked["label"], mask=picked["mask"]))
    return SiteLayout(root, "flat", subjects, problems=problems, subject_problems=subject_problems)


# ------------------------------------------------------------------------------------ participants.tsv


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
