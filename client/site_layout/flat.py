"""Discovery in a flat layout: ``images/``, ``labels/`` and optional ``masks/``, matched by file name.

An image name may end in a BIDS contrast (``case01_FLAIR``; none means T1w). A label or mask matches the
image (or subject) whose name it extends by one of `FLAT_LABEL_SUFFIXES` / `FLAT_MASK_SUFFIXES`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from client.site_layout.common import SiteLayout, _rel, natural_key, nifti_stem
from client.subjects import STRUCTURAL_CONTRASTS, Problem, SubjectFiles

FLAT_LABEL_SUFFIXES: tuple[str, ...] = ("", "_dseg", "_seg", "_label", "_labels")
"""Endings a flat-layout label name may add to its image's (or subject's) name."""
FLAT_MASK_SUFFIXES: tuple[str, ...] = ("", "_mask", "_brainmask", "_brain_mask", "_desc-brain_mask")
"""Endings a flat-layout mask name may add to its image's (or subject's) name."""


def _split_flat_image(stem: str) -> tuple[str, str]:
    """``case01_FLAIR`` -> (``case01``, ``FLAIR``); names without a BIDS contrast suffix are T1w."""
    for contrast in STRUCTURAL_CONTRASTS:
        if stem.endswith("_" + contrast) and len(stem) > len(contrast) + 1:
            return stem[: -len(contrast) - 1], contrast
    return stem, "T1w"


def _flat_niftis(folder: Path, problems: list[Problem]) -> list[tuple[Path, str]]:
    """(path, stem) of the NIfTI files in ``folder``; subfolders and other files become problems."""
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
    """The subjects of the flat layout in ``root`` (images/, labels/, masks/)."""
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
