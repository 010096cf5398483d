"""The report's statistics: ``mean ± sd (median)`` table cells over subjects, and the two-sided Wilcoxon
signed-rank test (scipy) on paired per-subject mean Dice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class PairedTest:
    """A two-sided Wilcoxon signed-rank test on paired values (federated vs a baseline), or why not."""

    n: int
    """Pairs with both values finite."""
    median_difference: float | None
    """Median of federated - baseline over the pairs; None without pairs."""
    statistic: float | None = None
    pvalue: float | None = None
    not_applicable: str | None = None
    """Why no p-value: no pairs, too few pairs, every difference zero; None when tested."""


def paired_wilcoxon(federated: Sequence[float], baseline: Sequence[float]) -> PairedTest:
    """The two-sided Wilcoxon signed-rank test (scipy) of paired values, pairs with a non-finite value
    dropped; not applied below `MIN_WILCOXON_PAIRS` pairs or when every difference is zero."""
    a, b = np.asarray(federated, dtype=float), np.asarray(baseline, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(a.size)
    if n == 0:
        return PairedTest(0, None, not_applicable="no pairs")
    diff = a - b
    median = float(np.median(diff))
    if n < MIN_WILCOXON_PAIRS:
        return PairedTest(n, median, not_applicable=f"fewer than {MIN_WILCOXON_PAIRS} pairs")
    if np.all(diff == 0):
        return PairedTest(n, median, not_applicable="every difference is zero")
    from scipy.stats import wilcoxon

    result = wilcoxon(a, b, alternative="two-sided")
    return PairedTest(n, median, float(result.statistic), float(result.pvalue))


def wilcoxon_line(label: str, federated: Sequence[float], baseline: Sequence[float]) -> str:
    """One sentence: the two-sided Wilcoxon signed-rank test on paired values, or why it does not apply."""
    test = paired_wilcoxon(federated, baseline)
    head = f"Wilcoxon signed-rank test, {label}, per-subject mean Dice: n = {test.n} pairs"
    if test.median_difference is None:
        return f"{head}; not applicable (no pairs)."
    median = f"median difference (federated - baseline) {test.median_difference:+.3f}"
    if test.pvalue is None and test.n < MIN_WILCOXON_PAIRS:
        return (
            f"{head}, {median}; not applicable: {test.not_applicable} cannot reach p < 0.05 "
            "(use more test subjects)."
        )
    if test.pvalue is None:
        return f"{head}; not applicable: {test.not_applicable}."
    return f"{head}, {median}, W = {test.statistic:.1f}, p = {test.pvalue:.3g}."


def p_cell(test: PairedTest) -> str:
    """A table cell of a test's p-value: ``p = 0.031``, or ``n/a (<why>)``."""
    if test.pvalue is None:
        return f"n/a ({test.not_applicable}, n = {test.n})" if test.n else "n/a (no pairs)"
    return f"p = {test.pvalue:.3g} (n = {test.n})"
