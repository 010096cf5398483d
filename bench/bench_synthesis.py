"""Synthesis speed on one core: seconds per subject, from a label map in memory to three NIfTI images.

Run: ``.venv/bin/python bench/bench_synthesis.py [--subjects N] [--spacing MM] [--label-maps DIR]``

Prints, per anatomy source (the real label maps where present, the procedural phantom always):

- ``load``: the one-time gz load + validation of a label map (cached per map by ``synthesize_sites``);
- ``synthesize``: ``synthesize_subject`` alone: deformation, field of view, partial-volume sampling,
  intensity lookup, texture, bias field, slice thickness, Rician noise, reorientation, i.e. everything
  from the int16 label array in memory to the three ``Nifti1Image`` objects;
- ``write``: saving those three images as .nii.gz;
- ``phantom``: generating one phantom label map (at 1.0 and 1.5 mm).

Times are CPU seconds of this process (``time.process_time``) with every thread pool limited to one
thread, so they are per core whatever the machine.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/scipy are imported, so their thread pools start with one thread

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from study.head_phantom import make_head_phantom  # noqa: E402
from study.scanner_profiles import site_profiles  # noqa: E402
from study.synthesis import find_label_maps, load_label_map, synthesize_subject  # noqa: E402

DEFAULT_LABEL_MAPS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "label_maps"


def _cpu(fn, *args, **kwargs):
    start = time.process_time()
    result = fn(*args, **kwargs)
    return result, time.process_time() - start


def _summary(name: str, seconds: list[float]) -> str:
    return (
        f"{name:<34s} median {statistics.median(seconds):6.2f} s   "
        f"min {min(seconds):6.2f} s   max {max(seconds):6.2f} s   (n={len(seconds)})"
    )


def _bench_subjects(sources: list[tuple[np.ndarray, np.ndarray]], n_subjects: int, spacing_mm: float) -> None:
    profiles = site_profiles(4, seed=0)
    synth, write, shapes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(n_subjects):
            labels, affine = sources[k % len(sources)]
            profile = profiles[k % len(profiles)]
            rng = np.random.default_rng(k)
            images, seconds = _cpu(synthesize_subject, labels, affine, profile, rng, spacing_mm)
            synth.append(seconds)
            shapes.append(images[0].shape)
            start = time.process_time()
            for name, img in zip(("image", "dseg", "mask"), images, strict=True):
                nib.save(img, Path(tmp) / f"{name}.nii.gz")
            write.append(time.process_time() - start)
    print(_summary(f"synthesize ({spacing_mm:g} mm output)", synth))
    print(_summary("write 3 x .nii.gz", write))
    voxels = [int(np.prod(s)) for s in shapes]
    print(f"{'output grid':<34s} {min(voxels) / 1e6:.2f}-{max(voxels) / 1e6:.2f} M voxels, e.g. {shapes[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=8, help="subjects timed per anatomy source")
    parser.add_argument("--spacing", type=float, default=2.0, help="output voxel size in mm")
    parser.add_argument(
        "--label-maps",
        type=Path,
        default=Path(os.environ.get("NEUROFED_LABEL_MAPS", DEFAULT_LABEL_MAPS)),
        help="folder of real label maps; skipped when absent",
    )
    args = parser.parse_args()
    # Warm-up: first calls pay for imports and lazy initialisation inside numpy/scipy/nibabel.
    warm_labels, warm_affine = make_head_phantom(np.random.default_rng(0), spacing_mm=2.0)
    synthesize_subject(warm_labels, warm_affine, site_profiles(1, 0)[0], np.random.default_rng(0), 3.0)

    if args.label_maps.is_dir() and any(args.label_maps.glob("*.nii*")):
        paths = find_label_maps(args.label_maps)[:4]
        print(f"== real label maps ({args.label_maps}, {len(paths)} used) ==")
        loaded = [_cpu(load_label_map, p) for p in paths]
        print(_summary("load + validate (one-time per map)", [s for _, s in loaded]))
        _bench_subjects([m for m, _ in loaded], args.subjects, args.spacing)
    else:
        print(f"== real label maps: none in {args.label_maps}, skipped ==")

    print("== procedural head phantom ==")
    for spacing in (1.0, 1.5):
        phantoms = [_cpu(make_head_phantom, np.random.default_rng(k), spacing_mm=spacing) for k in range(3)]
        print(_summary(f"phantom at {spacing:g} mm", [s for _, s in phantoms]))
    _bench_subjects([m for m, _ in phantoms], args.subjects, args.spacing)


if __name__ == "__main__":
    main()
