"""Discovery in a BIDS dataset: images in ``sub-*/[ses-*/]anat/``, labels and masks there or in derivatives.

Labels (``*_dseg``) and masks (``*_mask``) attach to the subject and session of their folder, only when
in the subject's native space (`NATIVE_SPACES`), and only to images whose shared entities (acq-, run-,
...) agree. Several candidates for one subject are one problem that makes the subject unusable.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from client.site_layout.common import SiteLayout, _rel, _visible_dirs, _visible_files, natural_key, nifti_stem
from client.subjects import STRUCTURAL_CONTRASTS, Problem, SubjectFiles
from models.errors import NeurofedError

NATIVE_SPACES: frozenset[str] = frozenset({"orig", "native", "individual", "T1w", *STRUCTURAL_CONTRASTS})
"""``space-`` values of a BIDS derivative that lie on the subject's own image grid. A derivative in any
other space (``space-MNI152NLin2009cAsym``) is a template-space copy and is not a candidate label/mask."""


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


_Key = tuple[str, str | None]  # (sub-01, ses-pre | None)


@dataclass(frozen=True)
class _Found:
    """A candidate file and the entities of its BIDS name."""

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
    """The subjects (one per subject and session) of the BIDS dataset ``root``; see `discover_site`."""
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
