"""Benchmark: label-map post-processing (models/postprocessing.py) on held-out anatomy, per class, Dice and HD95.

Anatomy: the reserved label maps ``training_seg_11`` ... ``15`` (never part of the shipped starting model's
training), imaged by two simulated T1w scanners of study/scanner_profiles.py (sites 1 and 2 of
study/synthesis.py; the starting model was pretrained on its randomized generator only, never on these
profiles). Each subject goes through the sites' preprocessing and sliding-window inference once; its
probabilities are then turned into labels with every mode of ``POSTPROCESSING_MODES`` and scored on the
plan's grid (models/metrics.py).

Models:

- ``starting model``: the shipped starting model (``--model``), on all subjects;
- ``fine-tuned``: the starting model after ``--steps`` optimizer steps without DP on the second scanner's
  subjects of maps 11-13 (the run's default recipe: 48^3 patches, batch 2, Adam at the run's learning
  rate), scored on maps 14 and 15 of both scanners. ``--steps 0`` skips it.

Usage::

    .venv/bin/python bench/bench_postprocessing.py [--model builtin|PATH] [--steps 40] [--window 0] [--label-maps DIR] [--out DIR]

Figures are printed and kept in ``OUT/bench_postprocessing.json``, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_dp_recipe import DEFAULT_LABEL_MAPS, UNSEEN_ANATOMY, reserved_maps  # noqa: E402

TRAINING_MAPS = 3
"""The fine-tuned model trains on the first maps of the second scanner and is scored on the others."""


def load_subjects(folder: Path, plan, protocol) -> list[dict]:
    """Every synthesized subject, preprocessed: site, anatomy index (0-based), image and label on the grid;
    found as a site finds them (`client.site_layout.discover_site`)."""
    import nibabel as nib

    from client.preprocessing import preprocess_images
    from client.site_layout import discover_site

    subjects = []
    for site in sorted(folder.glob("site-*")):
        for k, found in enumerate(discover_site(site).subjects):
            image = nib.load(found.images[plan.input_contrasts[0]])
            prepared = preprocess_images(found.subject_id, [image], plan, protocol, label=nib.load(found.label))
            subjects.append(
                {"site": site.name, "anatomy": k, "image": prepared.image, "label": prepared.label}
            )
    return subjects


def score(
    model, subjects: list[dict], protocol, spacing_mm, window: tuple[int, ...]
) -> dict[str, dict[str, dict[str, float]]]:
    """mode -> class -> {"dice", "hd95_mm"} means over ``subjects`` (finite HD95 only; ``hd95_missing`` counts
    the others), plus class ``"mean"`` over the foreground classes; sliding windows of ``window`` voxels."""
    from models.inference import predict_volume
    from models.metrics import segmentation_metrics
    from models.postprocessing import POSTPROCESSING_MODES, predicted_labels

    per_mode: dict[str, list[dict]] = {mode: [] for mode in POSTPROCESSING_MODES}
    for subject in subjects:
        probabilities = predict_volume(model, subject["image"], window)
        for mode in POSTPROCESSING_MODES:
            labels = predicted_labels(probabilities, mode)
            per_mode[mode].append(
                segmentation_metrics(labels, subject["label"], protocol.class_names, spacing_mm)
            )
    table: dict[str, dict[str, dict[str, float]]] = {}
    for mode, results in per_mode.items():
        table[mode] = {}
        for name in protocol.class_names[1:]:
            dice = [r[name]["dice"] for r in results]
            hd95 = [r[name]["hd95_mm"] for r in results if math.isfinite(r[name]["hd95_mm"])]
            table[mode][name] = {
                "dice": float(np.mean(dice)),
                "hd95_mm": float(np.mean(hd95)) if hd95 else math.nan,
                "hd95_missing": len(results) - len(hd95),
            }
        classes = [table[mode][n] for n in protocol.class_names[1:]]
        table[mode]["mean"] = {m: float(np.mean([c[m] for c in classes])) for m in ("dice", "hd95_mm")}
    return table


def print_table(title: str, n_subjects: int, table: dict, class_names) -> None:
    names = [*class_names[1:], "mean"]
    print(f"\n{title} ({n_subjects} subjects): Dice / HD95 mm per class")
    print("| post-processing | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for mode, classes in table.items():
        cells = [f"{classes[n]['dice']:.3f} / {classes[n]['hd95_mm']:.1f}" for n in names]
        print(f"| {mode} | " + " | ".join(cells) + " |", flush=True)


def fine_tune(loaded, subjects: list[dict], steps: int, seed: int):
    """A copy of the loaded model trained ``steps`` steps without DP on ``subjects`` (the run's recipe)."""
    import copy

    import torch

    from contract.run_config import RunConfig
    from models.training import TrainingConfig, make_optimizer, train_steps

    run = RunConfig()
    model = copy.deepcopy(loaded.model)
    model.train()
    config = TrainingConfig.for_protocol(
        loaded.protocol,
        patch_size=(run.patch_size,) * 3,
        batch_size=run.batch_size,
        learning_rate=run.learning_rate,
        seed=seed,
    )
    torch.manual_seed(seed)
    train_steps(
        model,
        [(s["image"], s["label"]) for s in subjects],
        config,
        steps,
        optimizer=make_optimizer(model, config),
        rng=np.random.default_rng(seed),
    )
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin", help="starting model: builtin or a model file")
    parser.add_argument(
        "--steps", type=int, default=40, help="fine-tuning steps (0: skip the fine-tuned model)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--window",
        type=int,
        default=0,
        help="sliding-window edge, voxels (default 0: the model's training patch, as `neurofed segment` uses)",
    )
    parser.add_argument("--label-maps", type=Path, default=DEFAULT_LABEL_MAPS)
    parser.add_argument("--out", type=Path, default=None, help="keep the synthesized data and results here")
    args = parser.parse_args()
    if not all((args.label_maps / n).is_file() for n in UNSEEN_ANATOMY):
        print(f"skipped: the reserved label maps are not in {args.label_maps}")
        return 0

    import torch

    from client.preprocessing import PreprocessingPlan
    from models.model_file import load_model
    from models.starting_model import resolve
    from study.synthesis import synthesize_sites

    torch.set_num_threads(1)
    started = time.perf_counter()
    loaded = load_model(resolve(args.model))
    plan = PreprocessingPlan(**{k: v for k, v in loaded.plan.items() if k != "input_contrasts"})
    out = args.out or Path(tempfile.mkdtemp(prefix="neurofed-bench-postprocessing-"))
    folder = out / "sites"
    if not folder.is_dir():
        synthesize_sites(
            folder,
            n_sites=2,
            subjects_per_site=len(UNSEEN_ANATOMY),
            label_maps_dir=reserved_maps(args.label_maps, out / "maps"),
            spacing_mm=2.0,
            seed=args.seed + 15,
            contrasts="T1w,T1w",
            progress=False,
        )
    subjects = load_subjects(folder, plan, loaded.protocol)
    print(
        f"model: {resolve(args.model)}; anatomy: {', '.join(UNSEEN_ANATOMY)}; "
        f"{len(subjects)} subjects ({time.perf_counter() - started:.0f} s to synthesize and preprocess)"
    )
    window = (args.window,) * 3 if args.window else loaded.patch_size()
    print(f"sliding windows of {window} voxels")
    results = {"starting model": score(loaded.model, subjects, loaded.protocol, plan.target_spacing_mm, window)}
    print_table("starting model", len(subjects), results["starting model"], loaded.protocol.class_names)
    if args.steps > 0:
        sites = sorted({s["site"] for s in subjects})
        train = [s for s in subjects if s["site"] == sites[-1] and s["anatomy"] < TRAINING_MAPS]
        held_out = [s for s in subjects if s["anatomy"] >= TRAINING_MAPS]
        tuned = fine_tune(loaded, train, args.steps, args.seed)
        name = f"fine-tuned {args.steps} steps"
        results[name] = score(tuned, held_out, loaded.protocol, plan.target_spacing_mm, window)
        print_table(
            f"{name} on {len(train)} subjects, scored on maps 14-15",
            len(held_out),
            results[name],
            loaded.protocol.class_names,
        )
    (out / "bench_postprocessing.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{time.perf_counter() - started:.0f} s in all; results in {out / 'bench_postprocessing.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
