"""The named values some run settings take (contract/run_config.py), and what each means."""

from __future__ import annotations

STRATEGIES: tuple[str, ...] = (
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedbn",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
)
"""fedavg: weighted mean of site models; fedprox: fedavg + proximal term in the sites' loss;
fedavgm: fedavg with server momentum (the mean update as a pseudo-gradient, ``server-momentum``);
fedadam / fedyogi: server-side adaptive optimizer on the mean update; fedbn: fedavg over every array
except normalization layers, which each site keeps (personalised model). Robust to a few malicious sites
(Flower's implementations): fedmedian (coordinate-wise median), fedtrimmedavg (coordinate-wise mean
without the ``trimmed-fraction`` largest and smallest values), krum (the one update closest to its
n - f - 2 nearest others), multikrum (the mean of the ``multikrum-selected`` best by Krum's score),
bulyan (Krum selection, then a trimmed mean around the coordinate-wise median)."""

SERVER_LEARNING_RATE_DEFAULTS: dict[str, float] = {"fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01}
"""The server step size of the strategies that take one, where ``server-learning-rate`` is 0: FedAvgM's 1 is
FedAvg's own step (momentum then lengthens it), FedAdam's and FedYogi's 0.01 a step of about 0.01 per
parameter and round."""

ROBUST_STRATEGIES: tuple[str, ...] = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
"""Strategies whose aggregate one malicious site cannot move arbitrarily far."""

AGGREGATION_WEIGHTS: tuple[str, ...] = ("capped", "uniform")
"""How much each accepted update weighs in a weighted mean (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedbn,
multikrum): ``capped``, the site's reported number of training subjects but at most twice the median of
the other sites' reports (and at most what it declared when the run started); ``uniform``, every site
alike. A site's self-reported count can never outweigh the others by more than that."""

SERVER_DP_MODES: tuple[str, ...] = ("off", "fixed", "adaptive")
"""Site-level (user-level) DP at the coordinator (server/site_level_dp.py): off; each site's update clipped
to ``server-dp-clipping-norm``; or adaptive clipping (the norm follows the median update norm)."""

GRAD_SAMPLE_MODES: tuple[str, ...] = ("vmap", "functorch", "ghost", "hooks")
"""The per-sample gradient modes of privacy/dp_sgd.py (kept here so the run config imports no torch)."""


def min_training_sites(strategy: str, byzantine_sites: int) -> int:
    """The fewest accepted updates ``strategy`` aggregates while withstanding ``byzantine_sites`` malicious
    ones (Blanchard et al., 2017: Krum n >= 2f + 3; El Mhamdi et al., 2018: Bulyan n >= 4f + 3); 1 for the
    others."""
    if strategy in ("krum", "multikrum"):
        return 2 * byzantine_sites + 3
    if strategy == "bulyan":
        return 4 * byzantine_sites + 3
    return 1
