"""The report's statistics: ``mean ± sd (median)`` table cells over subjects, and the two-sided Wilcoxon
signed-rank test (scipy) on paired per-subject mean Dice."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_WILCOXON_PAIRS = 6
"""Below 6 pairs the exact two-sided signed-rank p-value cannot fall below 0.05 (its minimum is 2 / 2^n)."""


def _values(xs: Sequence[float | None]) -> np.ndarray:
    arr = np.array([np.nan if x is None else float(x) for x in xs], dtype=float)
    return arr[np.isfinite(arr)]


def summary_cell(xs: Sequence[float | None], digits: int = 3) -> str:
    """``mean ± sd (median)`` of the finite values, with ``n=`` when some were undefined; ``n/a`` if none."""
    finite = _values(xs)
    if finite.size == 0:
        return "n/a"
    text = f"{finite.mean():.{digits}f}"
    if finite.size > 1:
        text += f" ± {finite.std(ddof=1):.{digits}f}"
    text += f" ({np.median(finite):.{digits}f})"
    if finite.size < len(xs):
        text += f" n={finite.size}/{len(xs)}"
    return text


def wilcoxon_line(label: str, federated: Sequence[float], baseline: Sequence[float]) -> str:
    """One sentence: the two-sided Wilcoxon signed-rank test on paired values, or why it does not apply."""
    a, b = np.asarray(federated, dtype=float), np.asarray(baseline, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(a.size)
    head = f"Wilcoxon signed-rank test, {label}, per-subject mean Dice: n = {n} pairs"
    if n == 0:
        return f"{head}; not applicable (no pairs)."
    diff = a - b
    median = f"median difference (federated - baseline) {np.median(diff):+.3f}"
    if n < MIN_WILCOXON_PAIRS:
        return (
            f"{head}, {median}; not applicable: fewer than {MIN_WILCOXON_PAIRS} pairs cannot reach p < 0.05 "
            "(use more test subjects)."
        )
    if np.all(diff == 0):
        return f"{head}; not applicable: every difference is zero."
    from scipy.stats import wilcoxon

    result = wilcoxon(a, b, alternative="two-sided")
    return f"{head}, {median}, W = {result.statistic:.1f}, p = {result.pvalue:.3g}."
