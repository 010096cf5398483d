"""Benchmark: what scoring one model on a scan's own 1 mm grid costs, phase by phase (issue 15).

The study scores every model on every unseen-site subject twice: on the working grid, and on the scan's own
voxels as ``neurofed segment`` would label it (study/native_scoring.py). At 1 mm the second scoring was most
of a study's cross-site evaluation. This times its phases on the reserved label maps 11-15, imaged at 1 mm by
one simulated scanner, with the shipped starting model:

- **inference**: sliding-window inference on the 2 mm grid (the grid scoring's cost too, for scale);
- **mapping**: the grid probabilities onto the scan's voxels, then the argmax (``probabilities_to_native``);
- **post-processing**: the run's default mode, on the scan's voxels;
- **metrics**: Dice, HD95 and ASSD of every class against the scan's label map (``segmentation_metrics``),
  and beside it, in the same run, MONAI's own ``compute_dice``, ``compute_hausdorff_distance`` and
  ``compute_average_surface_distance`` on the same masks, with the largest difference between the two.

Usage::

    .venv/bin/python bench/bench_native_scoring.py [--label-maps DIR] [--out DIR] [--repeats 2]

Figures are printed (the best of ``--repeats`` per phase and subject, then the mean over subjects), never
asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_dp_recipe import DEFAULT_LABEL_MAPS, UNSEEN_ANATOMY, reserved_maps  # noqa: E402

from bench.phantom_sites import synthesize_once  # noqa: E402

NATIVE_SPACING_MM = 1.0
MONAI_METRICS = "MONAI's metrics"


def best_time(repeats: int, work, *args):
    """(the result of ``work(*args)``, its best wall time in seconds over ``repeats`` calls)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = work(*args)
        best = min(best, time.perf_counter() - started)
    return result, best


def monai_metrics(pred: np.ndarray, truth: np.ndarray, spacing, num_classes: int) -> dict[int, tuple]:
    """``{class: (dice, hd95_mm, assd_mm)}`` from MONAI's own three functions, one class at a time."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    out = {}
    for cls in range(1, num_classes):
        p, t = (torch.from_numpy(a == cls)[None, None].float() for a in (pred, truth))
        out[cls] = (
            float(compute_dice(p, t, include_background=True, ignore_empty=False)),
            float(compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)),
            float(
                compute_average_surface_distance(
                    p, t, include_background=True, symmetric=True, spacing=spacing
                )
            ),
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--label-maps", type=Path, default=DEFAULT_LABEL_MAPS)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-native-scoring")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    # MONAI 1.6's surface distances warn of a deprecated argument they pass themselves, once per class.
    warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
    if not all((args.label_maps / name).is_file() for name in UNSEEN_ANATOMY):
        print(f"skipped: the reserved label maps {UNSEEN_ANATOMY} are not in {args.label_maps}")
        return 0

    import nibabel as nib

    from client.preprocessing import PreprocessingPlan, preprocess_volume, probabilities_to_native
    from client.site_layout import discover_site
    from contract.run_config import RunConfig
    from models.inference import predict_volume
    from models.metrics import segmentation_metrics
    from models.model_file import load_model
    from models.postprocessing import postprocess_labels
    from models.starting_model import builtin_path

    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    data = synthesize_once(
        args.out.resolve() / "data",
        n_sites=1,
        subjects_per_site=len(UNSEEN_ANATOMY),
        label_maps_dir=reserved_maps(args.label_maps.resolve(), args.out.resolve() / "maps"),
        spacing_mm=NATIVE_SPACING_MM,
        progress=False,
    )
    loaded = load_model(builtin_path())
    plan = PreprocessingPlan.from_dict(loaded.plan)
    protocol, postprocessing = loaded.protocol, RunConfig().postprocessing
    phases: dict[str, list[float]] = {
        k: [] for k in ("inference", "mapping", "post-processing", "metrics", MONAI_METRICS)
    }
    largest_difference = 0.0
    for subject in discover_site(data / "site-01").subjects:
        image, label = nib.load(subject.images[plan.input_contrasts[0]]), nib.load(subject.label)
        truth = protocol.map_freesurfer(np.asanyarray(label.dataobj))
        spacing = tuple(float(z) for z in label.header.get_zooms()[:3])
        grid, transform = preprocess_volume([image], plan)
        roi = loaded.patch_size()
        probabilities, seconds = best_time(args.repeats, predict_volume, loaded.model, grid, roi)
        phases["inference"].append(seconds)
        labels, seconds = best_time(args.repeats, probabilities_to_native, probabilities, transform)
        phases["mapping"].append(seconds)
        labels, seconds = best_time(
            args.repeats, postprocess_labels, labels, protocol.num_classes, postprocessing
        )
        phases["post-processing"].append(seconds)
        ours, seconds = best_time(
            args.repeats, segmentation_metrics, labels, truth, protocol.class_names, spacing
        )
        phases["metrics"].append(seconds)
        theirs, seconds = best_time(args.repeats, monai_metrics, labels, truth, spacing, protocol.num_classes)
        phases[MONAI_METRICS].append(seconds)
        for cls, values in theirs.items():
            mine = ours[protocol.class_names[cls]]
            pairs = zip(values, (mine["dice"], mine["hd95_mm"], mine["assd_mm"]), strict=True)
            largest_difference = max(largest_difference, *(abs(a - b) for a, b in pairs))
        print(
            f"  {subject.subject_id} {truth.shape}: "
            + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in phases.items()),
            flush=True,
        )
    print(
        f"\nmean over {len(phases['inference'])} subjects at {NATIVE_SPACING_MM:g} mm (best of {args.repeats}):"
    )
    for name, values in phases.items():
        print(f"  {name:16s} {np.mean(values):6.2f} s")
    own_grid = sum(np.mean(phases[k]) for k in ("mapping", "post-processing", "metrics"))
    print(f"  scoring on the scan's own grid (mapping + post-processing + metrics): {own_grid:.2f} s")
    speedup = np.mean(phases[MONAI_METRICS]) / np.mean(phases["metrics"])
    print(
        f"  metrics: {speedup:.2f}x faster than MONAI's own functions; the largest difference in any Dice, "
        f"HD95 or ASSD: {largest_difference:.2e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
