"""Tiny phantom sites: BIDS folders of 20^3-voxel (4 mm) spherical heads, quick to preprocess and train on.

Used by bench/bench_deployment.py and by the federation and deployment tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPE = (20, 20, 20)
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


def write_tiny_site(folder: Path, n_subjects: int, gain: float, seed: int | np.random.Generator) -> None:
    """Write ``n_subjects`` spherical heads into the BIDS site ``folder``.

    FreeSurfer labels: CSF (24) shell, cortex (3), white matter (2), a ventricle (4) at the centre; the
    T1w image is 1, 2, 3, 1 for them times ``gain`` (one intensity profile per scanner) plus noise.
    ``seed`` may be a Generator that several sites share.
    """
    import nibabel as nib

    rng = np.random.default_rng(seed)  # a Generator is used as it is
    axes = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    intensity = np.zeros(25, np.float32)
    intensity[[24, 3, 2, 4]] = (1.0, 2.0, 3.0, 1.0)
    for j in range(n_subjects):
        radius = np.sqrt(sum((a - c) ** 2 for a, c in zip(axes, 9.5 + rng.normal(0, 1, 3), strict=True)))
        label = np.zeros(SHAPE, np.int32)
        label[radius < 8], label[radius < 6.5], label[radius < 4.5], label[radius < 1.5] = 24, 3, 2, 4
        image = intensity[label] * gain + rng.normal(0, 0.2, label.shape).astype(np.float32)
        sub = f"sub-{j + 1:02d}"
        for kind, data, name in (("", image, "T1w"), ("derivatives/labels", label, "dseg")):
            out = folder / kind / sub / "anat"
            out.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, AFFINE), out / f"{sub}_{name}.nii.gz")
