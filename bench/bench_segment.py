"""Benchmark of `neurofed segment` on one 1 mm 256^3 head with the default model, on CPU.

The whole clinical path is timed: validation of the input, preprocessing to the model's plan (2 mm),
sliding-window inference, mapping the probabilities back onto the native 1 mm grid, and writing the
label map, the volumes table and the QC image. The head is a T1w image synthesized at 1 mm from a real
label map (../shared/data/label_maps) where present, else from the built-in phantom. The model has
untrained weights: time and memory do not depend on them. Figures are printed, never asserted::

    .venv/bin/python bench/bench_segment.py [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LABEL_MAPS = Path(os.environ.get("NEUROFED_LABEL_MAPS", ROOT.parent / "shared" / "data" / "label_maps"))


def _one_mm_head(folder: Path) -> tuple[Path, str]:
    """A 1 mm T1w NIfTI on a 256^3 grid; returns its path and where its anatomy came from."""
    import nibabel as nib
    import numpy as np

    from study.head_phantom import make_head_phantom
    from study.scanner_profiles import site_profiles
    from study.synthesis import find_label_maps, load_label_map, synthesize_subject

    rng = np.random.default_rng(0)
    maps = find_label_maps(LABEL_MAPS) if LABEL_MAPS.is_dir() else []
    if maps:
        labels, affine = load_label_map(maps[0])
        anatomy = f"real label map {maps[0].name}"
    else:
        labels, affine = make_head_phantom(rng, spacing_mm=1.0)
        anatomy = "built-in phantom"
    image, _, _ = synthesize_subject(labels, affine, site_profiles(1, seed=0)[0], rng, spacing_mm=1.0)
    data = np.zeros((256, 256, 256), dtype=np.float32)
    src = np.asarray(image.dataobj, dtype=np.float32)
    crop = tuple(slice(0, min(a, 256)) for a in src.shape)
    data[crop] = src[crop]
    path = folder / "head_T1w.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), path)
    return path, anatomy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    args = parser.parse_args()

    import torch

    from client.preprocessing import PreprocessingPlan
    from client.segmentation import segment_file
    from models.label_protocols import TISSUE
    from models.model_file import load_model, save_model
    from models.networks import NetworkConfig, build_network
    from models.training import TrainingConfig

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source, anatomy = _one_mm_head(folder)
        network = NetworkConfig.default(1, TISSUE.num_classes)
        model_path = folder / "model.pt"
        save_model(
            model_path,
            build_network(network, seed=0).state_dict(),
            network=network,
            protocol=TISSUE,
            plan=PreprocessingPlan().to_dict(),
            training={"training_config": TrainingConfig().to_dict()},
        )
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        loaded = load_model(model_path)
        segment_file(loaded, source, folder / "warmup_dseg.nii.gz")  # first call pays one-off kernel set-up
        started = time.perf_counter()
        cpu_started = time.process_time()
        segment_file(loaded, source, folder / "head_dseg.nii.gz")
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"input: 256^3 at 1 mm, T1w synthesized from {anatomy}")
    print(
        f"model: default {network.architecture} {network.channels}, plan 2 mm, {args.threads} torch threads"
    )
    print(
        f"segment one head (validate, preprocess, infer, map back, write outputs): {wall:.1f} s wall, "
        f"{cpu:.1f} s CPU (target < 30 s on 2 cores)"
    )
    print(
        f"peak resident memory of the process: {peak:.0f} MiB (before the model was loaded: {rss_before:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
