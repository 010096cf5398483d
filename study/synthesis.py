"""Multi-site brain MRI synthesis: the project's default data and the federation's test bed.

``synthesize_subject`` turns one FreeSurfer label map into the image one simulated scanner would
acquire of it: a smooth random deformation (small affine + elastic), partial-volume sampling, a
per-label intensity lookup around the scanner's tissue means, within-tissue texture, a smooth bias
field, slice thickness, Rician noise, a field of view and the scanner's voxel orientation.
``synthesize_sites`` (here) writes one BIDS dataset per simulated site.

The subject lives in study/image_synthesis.py (imaging) and study/subject_geometry.py (deformation and
field of view), label maps in study/label_maps.py; ``synthesize_subject``, ``find_label_maps`` and
``load_label_map`` are importable from here too.

Every random draw comes from ``numpy.random.Generator`` objects seeded from
``np.random.SeedSequence(seed, spawn_key=(stream, site, subject))``: output is the same for the
same seed, whatever the order or process in which sites and subjects are made.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from common.ordered_work import in_order, usable_cores
from common.progress import Progress
from models.errors import NeurofedError
from study.head_phantom import make_head_phantom
from study.image_synthesis import synthesize_subject
from study.label_maps import check_label_map_header, find_label_maps, load_label_map
from study.public_anatomy import file_sha256
from study.scanner_profiles import ScannerProfile, site_profiles

SUBJECT_STREAM = 1
"""First spawn-key element of the per-subject synthesis streams: ``(1, site, subject)``."""
PHANTOM_STREAM = 2
"""First spawn-key element of the per-subject phantom anatomy streams: ``(2, site, subject)``."""
BIDS_VERSION = "1.9.0"
SYNTHESIS_THREADS = usable_cores(2)
"""Subjects synthesized at once (their sampling, resampling and gzip release the GIL); each holds its
whole-head volumes in memory."""


def _subject_rng(seed: int, stream: int, site: int, subject: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, site, subject)))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("neurofed")
    except PackageNotFoundError:
        return "unknown"


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def synthesize_sites(
    out_dir: Path,
    n_sites: int = 4,
    subjects_per_site: int | Sequence[int] = 6,
    label_maps_dir: Path | None = None,
    spacing_mm: float = 2.0,
    seed: int = 0,
    overwrite: bool = False,
    contrasts: str | Sequence[str] | None = None,
    phantom_spacing_mm: float | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write ``out_dir/site-01`` ... ``site-NN``, one BIDS dataset per simulated scanner.

    Each site folder holds ``dataset_description.json``, ``participants.tsv``,
    ``sub-001/anat/sub-001_<weighting>.nii.gz`` (float32), ``derivatives/labels/sub-001/anat/``
    ``sub-001_dseg.nii.gz`` (int16 FreeSurfer values) and ``sub-001_desc-brain_mask.nii.gz`` (uint8,
    1 inside the skull: brain, ventricles and CSF), all three on one grid and affine, and
    ``site.json`` (the scanner profile, seed and random streams).

    Anatomy: with ``label_maps_dir``, site s (0-based) subject k uses map ``(K_0 + ... + K_{s-1} + k) mod M``
    of the M maps sorted by name (``K_i`` subjects at site i), so sites get disjoint maps when there are enough; without it, a procedural
    head phantom per subject, generated at ``phantom_spacing_mm`` (default: 0.75 x spacing_mm, within
    1-2 mm). Each site is built in a hidden temporary folder beside it and renamed into place when
    complete, so an interrupted run leaves no half-written site.

    Args:
        subjects_per_site: subjects of every site, or one count per site.
        contrasts: weightings cycled over sites, e.g. ``"T1w,T2w,PDw"``; default all T1w.
        progress: show the progress, a step per subject (common/progress.py).

    Returns:
        The site folders, in site order.

    Raises:
        NeurofedError: for bad options, unreadable or non-3D label maps, or site folders that exist
            already (unless ``overwrite``): then nothing is written. A label map whose values are not
            FreeSurfer labels stops the run at the first site that uses it; sites finished before it
            stay complete, the unfinished one is removed.
    """
    out_dir = Path(out_dir)
    counts = (
        [int(subjects_per_site)] * n_sites if isinstance(subjects_per_site, int) else list(subjects_per_site)
    )
    if len(counts) != n_sites or min(counts, default=0) < 1:
        raise NeurofedError(f"--subjects-per-site {subjects_per_site}: need at least 1 subject for each of {n_sites} sites")
    first_subject = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    if not 0.5 <= spacing_mm <= 8.0:
        raise NeurofedError(f"--spacing {spacing_mm}: output voxel size must be 0.5-8 mm")
    if seed < 0:
        raise NeurofedError(f"--seed {seed}: the seed must be a non-negative integer")
    profiles = site_profiles(n_sites, seed, contrasts)
    maps = find_label_maps(label_maps_dir) if label_maps_dir is not None else []
    used = maps[: sum(counts)]
    for path in used:
        check_label_map_header(path)
    if phantom_spacing_mm is None:
        phantom_spacing_mm = float(np.clip(0.75 * spacing_mm, 1.0, 2.0))
    site_width = max(2, len(str(n_sites)))
    subject_width = max(3, len(str(max(counts))))
    site_names = [f"site-{s + 1:0{site_width}d}" for s in range(n_sites)]
    existing = [name for name in site_names if (out_dir / name).exists()]
    if existing and not overwrite:
        raise NeurofedError(
            f"{out_dir}: site folders already exist ({', '.join(existing)}); "
            "pass --overwrite to replace them or choose another output folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    load = functools.lru_cache(maxsize=2)(load_label_map)
    digest = functools.lru_cache(maxsize=None)(file_sha256)

    site_dirs = []
    with Progress("synthesizing", sum(counts), show=progress) as bar:
        for s, (name, profile) in enumerate(zip(site_names, profiles, strict=True)):
            scanner = f"({profile.name}, {profile.weighting})"
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out_dir))
            try:
                jobs = [
                    _SubjectJob(
                        site=s,
                        index=k,
                        subject_id=f"sub-{k + 1:0{subject_width}d}",
                        label_map=maps[(first_subject[s] + k) % len(maps)] if maps else None,
                    )
                    for k in range(counts[s])
                ]
                make = functools.partial(
                    _make_subject,
                    profile=profile,
                    staging=staging,
                    seed=seed,
                    spacing_mm=spacing_mm,
                    phantom_spacing_mm=phantom_spacing_mm,
                    load=load,
                    digest=digest,
                )
                bar.working_on(f"{name} {scanner}")
                subjects = []
                # Each subject draws from its own streams, so making a few at once changes no voxel.
                for subject in in_order(make, jobs, SYNTHESIS_THREADS):
                    subjects.append(subject)
                    bar.advance(f"{name} {subject['participant_id']} {scanner}")
                _write_site_metadata(
                    staging, name, profile, subjects, seed, s, spacing_mm, label_maps_dir, phantom_spacing_mm
                )
                site_dirs.append(_commit(staging, out_dir / name))
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        bar.note(f"wrote {n_sites} site(s) to {out_dir}")
    return site_dirs


@dataclass(frozen=True)
class _SubjectJob:
    """One subject to synthesize: site ``site`` (0-based), its ``index``-th subject, from ``label_map`` (a
    FreeSurfer label map) or, where None, from a procedural head phantom."""

    site: int
    index: int
    subject_id: str
    label_map: Path | None


def _make_subject(
    job: _SubjectJob,
    *,
    profile: ScannerProfile,
    staging: Path,
    seed: int,
    spacing_mm: float,
    phantom_spacing_mm: float,
    load: Callable[[Path], tuple[np.ndarray, np.ndarray]],
    digest: Callable[[Path], str],
) -> dict:
    """Synthesize one subject as ``profile``'s scanner images it and write it into ``staging``; its
    participants entry (`_write_subject`)."""
    if job.label_map is not None:
        labels, affine = load(job.label_map)
        anatomy, anatomy_sha256 = job.label_map.name, digest(job.label_map)
    else:
        phantom_rng = _subject_rng(seed, PHANTOM_STREAM, job.site, job.index)
        labels, affine = make_head_phantom(phantom_rng, spacing_mm=phantom_spacing_mm)
        anatomy, anatomy_sha256 = "phantom", None
    rng = _subject_rng(seed, SUBJECT_STREAM, job.site, job.index)
    images = synthesize_subject(labels, affine, profile, rng, spacing_mm)
    return _write_subject(staging, job.subject_id, profile.weighting, images, anatomy, anatomy_sha256)


def _write_subject(
    site_dir: Path,
    subject_id: str,
    weighting: str,
    images: tuple[nib.Nifti1Image, nib.Nifti1Image, nib.Nifti1Image],
    anatomy: str,
    anatomy_sha256: str | None,
) -> dict:
    image, dseg, mask = images
    paths = {
        "image": Path(subject_id, "anat", f"{subject_id}_{weighting}.nii.gz"),
        "dseg": Path("derivatives", "labels", subject_id, "anat", f"{subject_id}_dseg.nii.gz"),
        "mask": Path("derivatives", "labels", subject_id, "anat", f"{subject_id}_desc-brain_mask.nii.gz"),
    }
    for key, img in zip(("image", "dseg", "mask"), images, strict=True):
        target = site_dir / paths[key]
        target.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, target)
    return {
        "participant_id": subject_id,
        "anatomy": anatomy,
        "anatomy_sha256": anatomy_sha256,
        "shape": [int(n) for n in image.shape],
        "orientation": "".join(nib.aff2axcodes(image.affine)),
        **{key: str(p) for key, p in paths.items()},
    }


def _write_site_metadata(
    site_dir: Path,
    name: str,
    profile: ScannerProfile,
    subjects: list[dict],
    seed: int,
    site_index: int,
    spacing_mm: float,
    label_maps_dir: Path | None,
    phantom_spacing_mm: float,
) -> None:
    generated_by = [{"Name": "neurofed synth", "Version": _version()}]
    _write_json(
        site_dir / "dataset_description.json",
        {
            "Name": f"neurofed simulated {name} ({profile.name}, {profile.weighting})",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "GeneratedBy": generated_by,
        },
    )
    _write_json(
        site_dir / "derivatives" / "labels" / "dataset_description.json",
        {
            "Name": f"neurofed simulated {name}: FreeSurfer label maps and brain masks",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": generated_by,
        },
    )
    rows = ["participant_id\tanatomy"] + [f"{s['participant_id']}\t{s['anatomy']}" for s in subjects]
    (site_dir / "participants.tsv").write_text("\n".join(rows) + "\n")
    _write_json(
        site_dir / "participants.json",
        {"anatomy": {"Description": "label map the subject's anatomy was deformed from, or 'phantom'"}},
    )
    _write_json(
        site_dir / "site.json",
        {
            "site": name,
            "seed": seed,
            "random_streams": {
                "profile": [0, site_index],
                "subject_synthesis": [SUBJECT_STREAM, site_index, "subject index"],
                "phantom_anatomy": [PHANTOM_STREAM, site_index, "subject index"],
                "how": "numpy.random.SeedSequence(seed, spawn_key=stream)",
            },
            "spacing_mm": spacing_mm,
            "anatomy": "label_maps" if label_maps_dir is not None else "phantom",
            "label_maps_dir": str(label_maps_dir) if label_maps_dir is not None else None,
            "phantom_spacing_mm": None if label_maps_dir is not None else phantom_spacing_mm,
            "scanner_profile": profile.to_dict(),
            "subjects": subjects,
            "generated_by": generated_by,
        },
    )


def _commit(staging: Path, final: Path) -> Path:
    """Move the complete site from ``staging`` to ``final``, replacing an existing folder last."""
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / final.name)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
    return final
