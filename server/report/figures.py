"""The report's figures (matplotlib, Agg backend): the generalization heatmap and per-round line plots,
each written atomically as a PNG."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from common.atomic_files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    # The temporary name keeps the .png suffix, from which savefig picks the format.
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, bbox_inches="tight"))


def plot_matrix(matrix: np.ndarray, rows: Sequence[str], columns: Sequence[str], path: Path) -> None:
    """Heatmap of mean Dice, models (rows) x test sites (columns), annotated."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 1.0 + 0.5 * len(rows)))
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), value in np.ndenumerate(matrix):
        if math.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set_xlabel("test site")
    ax.set_title("mean Dice on each site's test split")
    fig.colorbar(image, ax=ax, label="mean Dice")
    _save_figure(fig, path)
    plt.close(fig)


def plot_per_round(
    series: Mapping[str, Sequence[tuple[int, float]]], ylabel: str, title: str, path: Path
) -> None:
    """One line per label of ``(round, value)`` points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, points in sorted(series.items()):
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", linestyle="--" if "unseen" in label else "-", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save_figure(fig, path)
    plt.close(fig)
