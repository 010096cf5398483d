"""Benchmark: the shipped starting model alone on anatomy it never saw, across contrasts, skull stripping and
input resolution.

Anatomy: the reserved label maps ``training_seg_11`` ... ``15`` (never part of the starting model's training),
one subject per map per condition, each imaged by the simulated scanners of study/scanner_profiles.py
(the "realistic" profiles sites are synthesized with, not the pretraining generator):

- T1w: the four T1-weighted scanners (MPRAGE 3T, T1 spin echo 1.5T with 4 mm slices, SPGR 1.5T, FLASH 3T);
- T2w and PDw: the T2-weighted and proton-density scanners (contrasts the sites' own T1w data never have);
- skull-stripped: the MPRAGE images with everything outside the brain mask set to 0;
- 1 mm: the MPRAGE scanner writing 1 mm isotropic images (the plan resamples them to 2 mm).

Each subject goes through the sites' preprocessing (normalised inside its head mask: no brain mask, as for a
user's scan) and sliding-window inference; mean tissue Dice (CSF, grey, white matter) on the plan's 2 mm grid.

Usage::

    .venv/bin/python bench/bench_starting_model.py [--model builtin|PATH] [--label-maps DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_dp_recipe import DEFAULT_LABEL_MAPS, UNSEEN_ANATOMY, reserved_maps  # noqa: E402

CONDITIONS = {
    # name: (contrast cycle given to the sites, sites, spacing mm, skull-stripped)
    "T1w (4 scanners)": ("T1w", 4, 2.0, False),
    "T2w (2 scanners)": ("T2w", 2, 2.0, False),
    "PDw": ("PDw", 1, 2.0, False),
    "T1w MPRAGE, skull-stripped": ("T1w", 1, 2.0, True),
    "T1w MPRAGE, 1 mm input": ("T1w", 1, 1.0, False),
}


def score_folder(model, site: Path, plan, protocol, stripped: bool) -> list[float]:
    """Mean tissue Dice of every subject of a synthesized site folder."""
    import nibabel as nib

    from client.preprocessing import preprocess_images
    from models.inference import predict_volume
    from models.metrics import segmentation_metrics

    scores = []
    for image_path in sorted(site.glob("sub-*/anat/*.nii.gz")):
        subject = image_path.parts[-3]
        labels_dir = site / "derivatives" / "labels" / subject / "anat"
        image = nib.load(image_path)
        mask = nib.load(labels_dir / f"{subject}_desc-brain_mask.nii.gz")
        if stripped:
            data = np.where(np.asarray(mask.dataobj) > 0, image.get_fdata(dtype=np.float32), 0.0)
            image = nib.Nifti1Image(data.astype(np.float32), image.affine)
        prepared = preprocess_images(subject, [image], plan, protocol, label=nib.load(labels_dir / f"{subject}_dseg.nii.gz"))
        probabilities = predict_volume(model, prepared.image, (48,) * 3)
        metrics = segmentation_metrics(probabilities.argmax(0), prepared.label, protocol.class_names, plan.target_spacing_mm)
        scores.append(float(np.mean([metrics[c]["dice"] for c in protocol.class_names[1:]])))
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin", help="starting model: builtin or a model file")
    parser.add_argument("--label-maps", type=Path, default=DEFAULT_LABEL_MAPS)
    parser.add_argument("--out", type=Path, default=None, help="keep the synthesized data here")
    args = parser.parse_args()
    if not all((args.label_maps / n).is_file() for n in UNSEEN_ANATOMY):
        print(f"skipped: the reserved label maps are not in {args.label_maps}")
        return 0

    import torch

    from client.preprocessing import PreprocessingPlan
    from models.model_file import load_model
    from models.starting_model import resolve
    from study.synthesis import synthesize_sites

    torch.set_num_threads(2)
    loaded = load_model(resolve(args.model))
    plan = PreprocessingPlan(**{k: v for k, v in loaded.plan.items() if k != "input_contrasts"})
    out = args.out or Path(tempfile.mkdtemp(prefix="neurofed-bench-start-"))
    maps = reserved_maps(args.label_maps, out / "maps")
    print(f"model: {resolve(args.model)} ({loaded.training.get('kind')}); anatomy: {', '.join(UNSEEN_ANATOMY)}")
    print("\n| condition | subjects | mean tissue Dice (mean ± sd) | min |\n|---|---|---|---|")
    for name, (contrast, n_sites, spacing, stripped) in CONDITIONS.items():
        started = time.perf_counter()
        folder = out / "".join(c if c.isalnum() else "-" for c in name)
        if not folder.is_dir():
            synthesize_sites(folder, n_sites=n_sites, subjects_per_site=len(UNSEEN_ANATOMY), label_maps_dir=maps,
                             spacing_mm=spacing, seed=11, contrasts=",".join([contrast] * n_sites), progress=False)
        scores = [s for site in sorted(folder.glob("site-*")) for s in score_folder(loaded.model, site, plan, loaded.protocol, stripped)]
        print(f"| {name} | {len(scores)} | {np.mean(scores):.3f} ± {np.std(scores):.3f} | {np.min(scores):.3f} |"
              f" <!-- {time.perf_counter() - started:.0f} s -->", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
