"""The report's figures (matplotlib, Agg backend), each written atomically as a PNG under the run
directory's ``figures/``: per-site bars of the compared models with per-subject points, the generalization
heatmap and per-round line plots."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from common.atomic_files import atomic_write
from contract.run_layout import FIGURES_DIR

SITE_COMPARISON_PNG = f"{FIGURES_DIR}/dice_per_site.png"
GENERALIZATION_PNG = f"{FIGURES_DIR}/generalization_matrix.png"
DICE_PER_ROUND_PNG = f"{FIGURES_DIR}/dice_per_round.png"
EPSILON_PER_ROUND_PNG = f"{FIGURES_DIR}/epsilon_per_round.png"
"""The report's figures, relative to the run directory."""

KIND_COLOURS = {
    "federated": "tab:blue",
    "personalised": "tab:purple",
    "local-only": "tab:orange",
    "pooled": "tab:green",
}
"""A bar's colour by the kind of model (evaluation.json ``models[].kind``)."""

Bar = tuple[str, str, Sequence[float]]
"""One bar of `plot_site_comparison`: (label, kind of model, per-subject values)."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    # The temporary name keeps the .png suffix, from which savefig picks the format.
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, bbox_inches="tight"))


def _draw_bars(ax, bars: Sequence[Bar], chance: float | None) -> None:
    """Bars of the per-subject means, each subject a point over its bar, and the chance level dashed."""
    for x, (_, kind, values) in enumerate(bars):
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            continue
        ax.bar(x, np.mean(finite), width=0.7, color=KIND_COLOURS.get(kind, "tab:gray"), alpha=0.85)
        jitter = np.linspace(-0.18, 0.18, len(finite)) if len(finite) > 1 else np.zeros(1)
        ax.scatter(x + jitter, finite, s=14, color="black", edgecolors="white", linewidths=0.5, zorder=3)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(bars)), [label for label, _, _ in bars], rotation=35, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_site_comparison(
    panels: Mapping[str, Sequence[Bar]], chance: Mapping[str, float], path: Path
) -> None:
    """One panel per test site (title -> its bars): each compared model's mean Dice over the site's test
    subjects as a bar, every subject's mean Dice as a point over it; ``chance``: a panel's chance level
    (dashed), where known. Mean Dice is in [0, 1]."""
    plt = _pyplot()
    widths = [max(len(bars), 2) for bars in panels.values()]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(1.2 + 0.75 * sum(widths), 3.6),
        sharey=True,
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    for ax, (title, bars) in zip(axes[0], panels.items(), strict=True):
        _draw_bars(ax, bars, chance.get(title))
        ax.set_title(title, fontsize=9)
    axes[0][0].set_ylim(0.0, 1.0)
    axes[0][0].set_ylabel("mean Dice per subject")
    used = {kind for bars in panels.values() for _, kind, _ in bars}
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for k, c in KIND_COLOURS.items() if k in used]
    labels = [k for k in KIND_COLOURS if k in used]
    if chance:
        handles.append(plt.Line2D([], [], color="gray", linestyle="--"))
        labels.append("chance")
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    _save_figure(fig, path)
    plt.close(fig)


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
