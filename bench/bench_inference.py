"""Benchmark: sliding-window inference time against windows per forward pass, on CPU.

One preprocessed 2 mm head (the demo's grid, 96 x 112 x 96 voxels), the built-in starting model, 48^3
windows with overlap 0.5 (what the cross-site evaluation, the sites' evaluation and `neurofed segment` run).
Each setting is timed ``--repeats`` times, interleaved, and the fastest kept; the probabilities of every
setting are compared with one window per pass. Time does not depend on the image content, so the image is
standard normal noise (the preprocessing z-scores real images to the same scale). Figures are printed,
never asserted::

    .venv/bin/python bench/bench_inference.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRID = (96, 112, 96)
WINDOWS = (1, 2, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    import torch

    from models.inference import WINDOWS_PER_PASS, predict_volume
    from models.model_file import load_model
    from models.starting_model import BUILTIN, resolve

    torch.set_num_threads(args.threads)
    model = load_model(resolve(BUILTIN)).model
    image = np.random.default_rng(0).standard_normal((1, *GRID), dtype=np.float32)
    reference = predict_volume(model, image, (48,) * 3, sw_batch_size=1)
    seconds: dict[int, list[float]] = {n: [] for n in WINDOWS}
    difference: dict[int, float] = {}
    for _ in range(args.repeats):
        for n in WINDOWS:
            start = time.perf_counter()
            probabilities = predict_volume(model, image, (48,) * 3, sw_batch_size=n)
            seconds[n].append(time.perf_counter() - start)
            difference[n] = float(np.abs(probabilities - reference).max())
    print(f"grid {GRID}, 48^3 windows, overlap 0.5, {args.threads} thread(s), best of {args.repeats}")
    for n in WINDOWS:
        best = min(seconds[n])
        print(
            f"windows per pass {n:2d}: {best:.2f} s per volume, {min(seconds[1]) / best:.2f}x one window per pass, "
            f"max |p - p(1)| {difference[n]:.1e}" + ("   <- default" if n == WINDOWS_PER_PASS else "")
        )


if __name__ == "__main__":
    main()
