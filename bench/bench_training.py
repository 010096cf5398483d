"""Benchmark of the segmentation core on CPU: training step, patch sampling, inference, metrics.

Each measurement runs in its own subprocess, so its peak resident memory (``ru_maxrss``) is its own.
Figures are printed, never asserted. Usage::

    .venv/bin/python bench/bench_training.py [--threads N] [--steps 5] [--skip-256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABEL_MAPS = Path(os.environ.get("NEUROFED_LABEL_MAPS", ROOT.parent / "shared" / "data" / "label_maps"))
NUM_CLASSES = 4  # the tissue protocol


def _peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_training(steps: int) -> dict:
    import numpy as np
    import torch

    from models.networks import NetworkConfig, build_network
    from models.training import PatchDataset, TrainingConfig, make_loss, make_optimizer, training_step

    config = TrainingConfig()  # 96^3 patches, batch 2, Adam
    model = build_network(NetworkConfig.default(1, NUM_CLASSES), seed=0)
    rng = np.random.default_rng(0)
    # A subject of the default preprocessing grid size (192 x 224 x 192 at 1 mm).
    label = rng.integers(0, NUM_CLASSES, size=(192, 224, 192), dtype=np.uint8)
    image = rng.normal(size=(1, *label.shape)).astype(np.float32)
    dataset = PatchDataset.from_config(
        [(image, label)], config, length=(steps + 1) * config.batch_size, seed=0
    )
    dataset[0]  # class locations are computed once per subject, on first use
    started = time.perf_counter()
    samples = [dataset[i] for i in range(len(dataset))]
    sampling_s = (time.perf_counter() - started) / len(samples)

    loss_fn, optimizer = make_loss(), make_optimizer(model, config)
    batches = [
        tuple(torch.stack(parts) for parts in zip(*samples[i : i + config.batch_size], strict=True))
        for i in range(0, len(samples), config.batch_size)
    ]
    training_step(model, batches[0], loss_fn, optimizer)  # warm-up: allocator, oneDNN kernels
    started = time.perf_counter()
    for batch in batches[1:]:
        training_step(model, batch, loss_fn, optimizer)
    step_s = (time.perf_counter() - started) / steps
    return {
        "step_s": step_s,
        "samples_per_s": config.batch_size / step_s,
        "sample_and_augment_s": sampling_s,
        "peak_rss_mib": _peak_rss_mib(),
    }


def measure_inference(size: int) -> dict:
    import numpy as np

    from models.inference import predict_volume
    from models.networks import NetworkConfig, build_network

    model = build_network(NetworkConfig.default(1, NUM_CLASSES), seed=0)
    image = np.random.default_rng(0).normal(size=(1, size, size, size)).astype(np.float32)
    started = time.perf_counter()
    probabilities = predict_volume(model, image, (96, 96, 96), overlap=0.5, sw_batch_size=1)
    seconds = time.perf_counter() - started
    assert probabilities.shape == (NUM_CLASSES, size, size, size)
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib()}


def measure_metrics() -> dict:
    import nibabel as nib
    import numpy as np

    from models.label_protocols import TISSUE
    from models.metrics import segmentation_metrics

    path = LABEL_MAPS / "training_seg_01.nii.gz"
    if not path.is_file():
        return {"skipped": f"{path} not found"}
    truth = TISSUE.map_freesurfer(np.asarray(nib.load(path).dataobj))
    pred = np.roll(truth, 1, axis=0)  # a realistic near-miss: every surface moves by 1 mm
    started = time.perf_counter()
    segmentation_metrics(pred, truth, TISSUE.class_names, (1.0, 1.0, 1.0))
    return {
        "seconds": time.perf_counter() - started,
        "shape": list(truth.shape),
        "peak_rss_mib": _peak_rss_mib(),
    }


def _run(measurement: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--measure",
        measurement,
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (after one warm-up)")
    parser.add_argument("--skip-256", action="store_true", help="skip the 256^3 inference (the longest part)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        import torch

        torch.set_num_threads(args.threads)
        kind, _, size = args.measure.partition(":")
        result = {
            "train": lambda: measure_training(args.steps),
            "infer": lambda: measure_inference(int(size)),
            "metrics": measure_metrics,
        }[kind]()
        print(json.dumps(result))
        return

    print(
        f"neurofed segmentation benchmark, CPU, {args.threads} torch threads, default unet, {NUM_CLASSES} classes"
    )
    train = _run("train", args)
    print(
        f"training step (96^3, batch 2, Adam):  {train['step_s']:.2f} s/step, {train['samples_per_s']:.2f} samples/s, "
        f"peak RSS {train['peak_rss_mib']:.0f} MiB"
    )
    print(f"patch sampling + augmentation:       {train['sample_and_augment_s'] * 1000:.0f} ms/sample")
    sizes = [128] if args.skip_256 else [128, 256]
    for size in sizes:
        infer = _run(f"infer:{size}", args)
        print(
            f"predict_volume {size}^3 (roi 96, overlap 0.5): {infer['seconds']:.1f} s, "
            f"peak RSS {infer['peak_rss_mib']:.0f} MiB"
        )
    metrics = _run("metrics", args)
    if "skipped" in metrics:
        print(f"segmentation_metrics: skipped ({metrics['skipped']})")
    else:
        print(
            f"segmentation_metrics tissue {tuple(metrics['shape'])} real label map: {metrics['seconds']:.1f} s, "
            f"peak RSS {metrics['peak_rss_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
