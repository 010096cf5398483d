"""Benchmark: the working resolution against Dice scored on the scans' native 1 mm grid (issue 15).

Two simulated scanners image the real label maps at 1 mm (study/synthesis.py, ``spacing_mm=1``): the first
images maps 01-10 (the training subjects), the second the reserved maps 11-15 (held-out anatomy on an unseen
scanner, never part of the shipped starting model's training). For each working spacing (``--spacings``):

- **ceiling**: each held-out label map taken onto the plan's grid as the sites' preprocessing takes labels
  (one-hot, anti-aliased, linear, argmax) and back onto the native grid (``labels_to_native``): the Dice of a
  segmentation that is perfect on the grid, the partial-volume limit of that spacing;
- **trained**: the run's network (``--architecture``, ``--network-preset``) from random weights, or from the shipped starting
  model's weights with ``--init start``, trained ``--steps`` steps on the training subjects preprocessed at
  that spacing, with the run's recipe (patch ``--patch-size`` voxels, batch 2, Adam 2e-3, the run's
  augmentation). The same voxels per patch and the same steps at every spacing: the same training compute,
  a patch covering fewer mm at the finer spacing;
- every held-out subject segmented as ``neurofed segment`` does (native NIfTI -> plan grid -> sliding window
  -> soft probabilities mapped onto the native grid, then the argmax -> post-processing ``largest-brain``),
  and scored there at 1 mm (Dice, HD95); beside it the argmax taken on the grid and mapped back as labels,
  and the score on the grid itself (as every other benchmark here scores);
- the cost: training seconds per step, and per held-out subject the CPU and wall seconds of preprocessing,
  inference and the mapping back, and the peak resident memory of training and of inference (this process,
  sampled every 20 ms).

Usage::

    .venv/bin/python bench/bench_resolution.py [--spacings 2,1.5] [--steps 400] [--init scratch|start]
        [--architecture unet] [--network-preset default] [--patch-size 48] [--label-maps DIR] [--out DIR] [--seed 0]

Figures are printed and kept in ``OUT/bench_resolution.json``, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_dp_recipe import DEFAULT_LABEL_MAPS, UNSEEN_ANATOMY  # noqa: E402

from bench.phantom_sites import synthesize_once  # noqa: E402

TRAINING_MAPS, HELD_OUT_MAPS = 10, len(UNSEEN_ANATOMY)
"""Subjects of the training scanner (maps 01-10) and of the unseen one (the reserved maps 11-15)."""
NATIVE_SPACING_MM = 1.0
POSTPROCESSING = "largest-brain"
"""The run default (models/postprocessing.py; BENCHMARKS.md, "Post-processing on held-out anatomy")."""


class PeakMemory:
    """Peak resident memory (MiB) of this process while the block runs, sampled from /proc every 20 ms."""

    def __enter__(self) -> PeakMemory:
        self.peak_mib = self._rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mib = max(self.peak_mib, self._rss_mib())

    @staticmethod
    def _rss_mib() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def mean_scores(results: list[dict[str, dict[str, float]]], class_names) -> dict[str, float]:
    """Dice and HD95 over the foreground classes of each class's mean over subjects (finite values only,
    as `models.metrics.summarize` takes them)."""
    from models.metrics import summarize

    summary = summarize(results)
    return {
        metric: float(np.nanmean([summary[c][metric]["mean"] for c in class_names[1:]]))
        for metric in ("dice", "hd95_mm")
    }


def load_site(site: Path, contrast: str) -> list[dict[str, Any]]:
    """The subjects of a synthesized site, as a site finds them: the ``contrast`` image and the label map
    (NIfTI, loaded lazily)."""
    import nibabel as nib

    from client.site_layout import discover_site

    return [
        {
            "id": f"{site.name}/{s.subject_id}",
            "image": nib.load(s.images[contrast]),
            "label": nib.load(s.label),
        }
        for s in discover_site(site).subjects
    ]


def train(run, subjects: list[dict], args, protocol) -> tuple[Any, dict[str, float]]:
    """The ``run``'s network trained ``args.steps`` steps on ``subjects`` preprocessed at its spacing; its costs."""
    import torch

    from client.preprocessing import preprocess_images
    from client.site_data import run_preprocessing_plan
    from client.site_model import build_model, run_training_config
    from models.model_file import load_model
    from models.starting_model import resolve
    from models.training import train_steps

    plan = run_preprocessing_plan(run)
    prepared = [preprocess_images(s["id"], [s["image"]], plan, protocol, label=s["label"]) for s in subjects]
    model = load_model(resolve("builtin")).model if args.init == "start" else build_model(run)
    torch.manual_seed(run.seed)
    with PeakMemory() as memory:
        result = train_steps(
            model,
            [(p.image, p.label) for p in prepared],
            run_training_config(run),
            args.steps,
            rng=np.random.default_rng(run.seed),
        )
    return model.eval(), {
        "seconds_per_step": result.seconds / max(1, result.steps),
        "peak_mib": memory.peak_mib,
        "final_loss": float(np.nanmean(result.losses[-20:])),
    }


def evaluate(model, run, subjects: list[dict], protocol) -> dict[str, Any]:
    """Ceiling, grid and native-grid scores of ``model`` on ``subjects`` at the ``run``'s spacing, and the
    inference costs."""
    from client.preprocessing import labels_to_native, preprocess_images
    from client.segmentation import native_segmentation
    from client.site_data import run_preprocessing_plan
    from models.inference import predict_volume
    from models.metrics import segmentation_metrics
    from models.postprocessing import predicted_labels

    plan = run_preprocessing_plan(run)
    names = protocol.class_names
    scores: dict[str, list] = {"ceiling": [], "grid": [], "native hard": [], "native soft": []}
    costs: dict[str, list[float]] = {"cpu_s": [], "wall_s": []}
    peak = 0.0
    for subject in subjects:
        native = protocol.map_freesurfer(np.asanyarray(subject["label"].dataobj))
        native_spacing = tuple(float(z) for z in subject["label"].header.get_zooms()[:3])
        cpu, wall = time.process_time(), time.perf_counter()
        with PeakMemory() as memory:
            prepared = preprocess_images(
                subject["id"], [subject["image"]], plan, protocol, label=subject["label"]
            )
            probabilities = predict_volume(model, prepared.image, (run.patch_size,) * 3)
            soft = native_segmentation(
                probabilities, prepared.transform, protocol.num_classes, POSTPROCESSING
            )
        costs["cpu_s"].append(time.process_time() - cpu)
        costs["wall_s"].append(time.perf_counter() - wall)
        peak = max(peak, memory.peak_mib)
        on_grid = predicted_labels(probabilities, POSTPROCESSING)
        scores["ceiling"].append(
            segmentation_metrics(
                labels_to_native(prepared.label, prepared.transform), native, names, native_spacing
            )
        )
        scores["grid"].append(segmentation_metrics(on_grid, prepared.label, names, plan.target_spacing_mm))
        scores["native hard"].append(
            segmentation_metrics(labels_to_native(on_grid, prepared.transform), native, names, native_spacing)
        )
        scores["native soft"].append(segmentation_metrics(soft, native, names, native_spacing))
        print(
            f"  {subject['id']}: 1 mm Dice {mean_scores(scores['native soft'][-1:], names)['dice']:.3f} "
            f"(ceiling {mean_scores(scores['ceiling'][-1:], names)['dice']:.3f}), "
            f"{costs['cpu_s'][-1]:.1f} CPU s",
            flush=True,
        )
    return {
        "grid_voxels": int(np.prod(plan.grid_shape)),
        "scores": {k: mean_scores(v, names) for k, v in scores.items()},
        "per_class_native_soft": {
            c: float(np.mean([r[c]["dice"] for r in scores["native soft"]])) for c in names[1:]
        },
        "inference_cpu_s": float(np.mean(costs["cpu_s"])),
        "inference_wall_s": float(np.mean(costs["wall_s"])),
        "inference_peak_mib": peak,
    }


def print_table(results: dict[str, dict]) -> None:
    print(
        "\n| spacing, patch, start, network, steps | grid voxels | train s/step | train peak MiB | ceiling at 1 mm | Dice on the grid "
        "| 1 mm, labels mapped | 1 mm, probabilities mapped (HD95 mm) | inference CPU s \\| wall s per subject "
        "| inference peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        s = r["scores"]
        print(
            f"| {key} | {r['grid_voxels'] / 1e6:.2f} M | {r['training']['seconds_per_step']:.2f} "
            f"| {r['training']['peak_mib']:.0f} | {s['ceiling']['dice']:.3f} | {s['grid']['dice']:.3f} "
            f"| {s['native hard']['dice']:.3f} | {s['native soft']['dice']:.3f} ({s['native soft']['hd95_mm']:.1f}) "
            f"| {r['inference_cpu_s']:.1f} \\| {r['inference_wall_s']:.1f} | {r['inference_peak_mib']:.0f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spacings", default="2,1.5", help="working spacings to compare, mm")
    parser.add_argument("--steps", type=int, default=400, help="training steps at every spacing")
    parser.add_argument(
        "--init",
        choices=("scratch", "start"),
        default="scratch",
        help="random weights, or the shipped starting model's (pretrained at 2 mm)",
    )
    parser.add_argument("--network-preset", default="default", help="tiny or default (models/networks.py)")
    parser.add_argument(
        "--architecture",
        default="unet",
        help="unet (MONAI residual UNet), dynunet or segresnet (models/networks.py)",
    )
    parser.add_argument(
        "--patch-size", type=int, default=48, help="training patch and inference window, voxels"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-maps", type=Path, default=DEFAULT_LABEL_MAPS)
    parser.add_argument(
        "--out", type=Path, default=Path("/tmp/neurofed-bench-resolution"), help="work folder"
    )
    args = parser.parse_args()
    if args.init == "start" and (args.architecture, args.network_preset) != ("unet", "default"):
        parser.error(
            "--init start needs --architecture unet --network-preset default (the starting model's network)"
        )
    maps = sorted(args.label_maps.glob("training_seg_*.nii.gz"))
    if len(maps) < TRAINING_MAPS + HELD_OUT_MAPS or not all(
        (args.label_maps / n).is_file() for n in UNSEEN_ANATOMY
    ):
        print(f"skipped: the 15 real label maps (training_seg_01..15) are not in {args.label_maps}")
        return 0

    from contract.run_config import RunConfig
    from models.label_protocols import get_protocol

    base = RunConfig(
        network_preset=args.network_preset,
        architecture=args.architecture,
        patch_size=args.patch_size,
        initial_model="none",
        seed=args.seed,
    )
    protocol = get_protocol(base.protocol)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    started = time.perf_counter()
    data = synthesize_once(
        args.out.resolve() / "data",
        n_sites=2,
        subjects_per_site=[TRAINING_MAPS, HELD_OUT_MAPS],
        label_maps_dir=args.label_maps.resolve(),
        spacing_mm=NATIVE_SPACING_MM,
        seed=args.seed,
        contrasts="T1w,T1w",
        progress=False,
    )
    training, held_out = (load_site(data / site, base.contrast) for site in ("site-01", "site-02"))
    results_path = args.out / "bench_resolution.json"
    results: dict[str, dict] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for spacing in (float(s) for s in args.spacings.split(",")):
        key = f"{spacing:g} mm, patch {args.patch_size}, {args.init}, {args.architecture} {args.network_preset}, {args.steps} steps"
        print(f"\n{key}: training", flush=True)
        run = base.replace(spacing_mm=spacing)
        model, training_costs = train(run, training, args, protocol)
        print(f"  {training_costs['seconds_per_step']:.2f} s per step", flush=True)
        results[key] = evaluate(model, run, held_out, protocol) | {"training": training_costs}
        results[key]["settings"] = {k: str(v) for k, v in vars(args).items()}
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\n{time.perf_counter() - started:.0f} s in all; results in {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
