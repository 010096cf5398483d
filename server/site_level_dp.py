"""Site-level (user-level) DP at the coordinator: a strategy wrapper that releases, each round, the uniform
mean of the sites' clipped updates plus Gaussian noise calibrated to the number of sites in that mean.

One round of `SiteLevelDP` over the k replies that reach it (those server/update_screening.py accepted):

1. Each site's update ``Δ_i = w_i - w`` (its arrays minus the global arrays, all arrays as one vector) is
   scaled down to L2 norm at most ``C`` (the clipping norm, in model-parameter units).
2. The mean ``(1/k) Σ Δ_i`` weighs every site 1/k: a site's self-reported ``num-examples`` has no say, so
   adding or removing one site's update moves the mean by at most ``C/k`` (its sensitivity, with k known).
3. Gaussian noise of std ``z x C / k`` (`SiteLevelDP.noise_std`) is added to every coordinate of that mean:
   the Gaussian mechanism with noise multiplier ``z`` (std / sensitivity), whatever k is.
4. The wrapped strategy takes its server step on ``w + noised mean``, handed to it as the only reply
   (FedAvg / FedProx: that is the new model; FedAdam / FedYogi: their optimizer step on it). The step only
   post-processes the release, so it costs no privacy; Flower's own wrappers noise the strategy's output
   instead, which for FedAdam / FedYogi is not calibrated to the step's sensitivity.

A round with fewer than ``min_sites`` replies is not released: `SiteLevelDP.aggregate_train` returns
``(None, None)`` (the global model stays as it was, as in Flower's strategies) and `skipped_rounds` says
why. `released_rounds` counts the rounds that were released; `server.strategies.server_dp_epsilon`
composes them. Which sites replied (k) is not hidden: the guarantee protects the content of a site's update.

Adaptive clipping (Andrew et al., Differentially Private Learning with Adaptive Clipping, NeurIPS 2021):
besides the mean, each round releases the count of unclipped updates with Gaussian noise of std ``σ_b``;
the norm then moves geometrically towards the target quantile of the update norms. The two releases
together are private as one Gaussian mechanism with the configured ``z`` when the mean's noise multiplier
is ``z_Δ = (z^-2 - (2 σ_b)^-2)^-1/2`` (Flower's `compute_adaptive_noise_params`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log
from flwr.supercore.differential_privacy import compute_adaptive_noise_params, compute_stdv

from contract.wire import ARRAYS_RECORD, METRICS_RECORD

SITES_KEY = "server-dp-sites"
"""Train metric: how many site updates the round's released mean averages (k)."""
NOISE_STD_KEY = "server-dp-noise-std"
"""Train metric: std of the Gaussian noise on each coordinate of the round's mean update (parameter units)."""


@dataclass(frozen=True)
class AdaptiveClipping:
    """How the clipping norm follows the sites' update norms (Andrew et al., 2021, geometric update).

    Attributes:
        count_noise_std: ``σ_b``, std of the Gaussian noise on the count of unclipped updates (in updates).
        target_unclipped_quantile: ``γ``, the share of updates meant to lie within the norm (0.5: the median).
        learning_rate: ``η`` of ``C <- C x exp(-η (b - γ))``, ``b`` the noised share of unclipped updates.
    """

    count_noise_std: float
    target_unclipped_quantile: float = 0.5
    learning_rate: float = 0.2


class SiteLevelDP(Strategy):
    """Clip each site's update to ``clipping_norm``, average them uniformly, noise the mean, then ``strategy``.

    Args:
        strategy: the aggregation strategy (FedAvg or a subclass: FedProx, FedAdam, FedYogi).
        noise_multiplier: ``z``, noise std / sensitivity of each release (of the mean and, with adaptive
            clipping, of the unclipped count together).
        clipping_norm: ``C``, L2 norm each site's update is clipped to, in model-parameter units (the
            initial norm with adaptive clipping).
        min_sites: fewest replies a round needs to be released (>= 1).
        adaptive: adaptive clipping settings; None for a fixed norm.
        rng: source of the noise; a fresh, OS-seeded generator by default.
    """

    def __init__(
        self,
        strategy: FedAvg,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        min_sites: int = 1,
        adaptive: AdaptiveClipping | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(strategy, FedAvg):
            raise TypeError(f"site-level DP needs a FedAvg-based strategy, got {type(strategy).__name__}")
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not clipping_norm > 0:
            raise ValueError(f"clipping_norm must be > 0, got {clipping_norm}")
        if min_sites < 1:
            raise ValueError(f"min_sites must be >= 1, got {min_sites}")
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.min_sites = min_sites
        self.adaptive = adaptive
        self.update_noise_multiplier = noise_multiplier
        """``z_Δ``: noise multiplier of the mean alone (``z`` with a fixed norm; larger with adaptive clipping)."""
        if adaptive is not None:
            _, self.update_noise_multiplier = compute_adaptive_noise_params(
                noise_multiplier, 1, adaptive.count_noise_std
            )
        self.rng = rng if rng is not None else np.random.default_rng()
        self.current_arrays = ArrayRecord()
        self.released_rounds = 0
        """Rounds whose noised mean was released (the count the privacy accounting composes)."""
        self.skipped_rounds: dict[int, str] = {}
        """Round -> why it was not released."""

    def __repr__(self) -> str:
        clipping = "adaptive" if self.adaptive else "fixed"
        return f"SiteLevelDP({self.strategy!r}, z={self.noise_multiplier}, {clipping} clipping)"

    def summary(self) -> None:
        log(INFO, "\t├──> Site-level DP (uniform mean of clipped updates, noise z·C/k):")
        z, z_mean = self.noise_multiplier, self.update_noise_multiplier
        log(INFO, "\t│\t├── Noise multiplier z: %s (of the mean alone: %s)", z, z_mean)
        clipping = "adaptive" if self.adaptive else "fixed"
        log(INFO, "\t│\t├── Clipping norm C: %s (%s)", self.clipping_norm, clipping)
        log(INFO, "\t│\t└── Fewest sites per release: %d", self.min_sites)
        self.strategy.summary()

    def noise_std(self, sites: int) -> float:
        """Std of the Gaussian noise on each coordinate of the mean of ``sites`` clipped updates:
        ``z_Δ x C / sites``, in model-parameter units."""
        return compute_stdv(self.update_noise_multiplier, self.clipping_norm, sites)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Release the noised uniform mean of the replies' clipped updates, or nothing below ``min_sites``."""
        updates = [r for r in replies if not r.has_error()]
        sites = len(updates)
        if sites < self.min_sites:
            reason = (
                f"{sites} site update(s) to aggregate, fewer than the {self.min_sites} site-level DP needs "
                "to release a round; the global model is unchanged"
            )
            self.skipped_rounds[server_round] = reason
            log(WARNING, "aggregate_train: round %d not released: %s", server_round, reason)
            return None, None
        mean, unclipped = self._clipped_mean(updates)
        noise_std = self.noise_std(sites)
        released = ArrayRecord(
            {
                key: Array(base + (step + self.rng.normal(0.0, noise_std, step.shape)).astype(step.dtype))
                for (key, base), step in zip(self._global_arrays().items(), mean, strict=True)
            }
        )
        as_reply = Message(
            content=RecordDict({ARRAYS_RECORD: released, METRICS_RECORD: self._uniform_metrics(updates)}),
            metadata=copy.copy(updates[0].metadata),
        )
        arrays, metrics = self.strategy.aggregate_train(server_round, [as_reply])
        if arrays is None:
            return None, metrics
        self.released_rounds += 1
        if self.adaptive is not None:
            self._adapt_clipping_norm(unclipped, sites)
        log(INFO, "aggregate_train: mean of %d clipped updates, noise std %.4g", sites, noise_std)
        metrics = MetricRecord(dict(metrics or {}))
        metrics[SITES_KEY] = sites
        metrics[NOISE_STD_KEY] = noise_std
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def _global_arrays(self) -> dict[str, np.ndarray]:
        return {key: array.numpy() for key, array in self.current_arrays.items()}

    def _clipped_mean(self, updates: list[Message]) -> tuple[list[np.ndarray], int]:
        """The uniform mean of the replies' updates, each clipped to ``clipping_norm``; and how many
        were within the norm (unclipped)."""
        base = self._global_arrays()
        total = [np.zeros_like(b) for b in base.values()]
        unclipped = 0
        for reply in updates:
            records = list(reply.content.array_records.values())
            if len(records) != 1 or set(records[0].keys()) != set(base):
                raise AggregationError(
                    reason=f"site-level DP: node {reply.metadata.src_node_id} did not send exactly the arrays "
                    "of the global model"
                )
            step = [records[0][key].numpy() - b for key, b in base.items()]
            norm = math.sqrt(sum(float(np.sum(np.square(s, dtype=np.float64))) for s in step))
            unclipped += int(norm <= self.clipping_norm)
            scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
            for acc, s in zip(total, step, strict=True):
                acc += (s * scale).astype(acc.dtype, copy=False)
        return [acc / len(updates) for acc in total], unclipped

    def _uniform_metrics(self, updates: list[Message]) -> MetricRecord:
        """The replies' train metrics averaged with weight 1 each, carrying weight 1 for the strategy."""
        key = self.strategy.weighted_by_key
        weighted_once = []
        for reply in updates:
            records = list(reply.content.metric_records.values())
            if len(records) != 1:
                raise AggregationError(reason="site-level DP: a reply must carry exactly one MetricRecord")
            weighted_once.append(RecordDict({METRICS_RECORD: MetricRecord({**dict(records[0]), key: 1})}))
        mean = aggregate_metricrecords(weighted_once, key)
        mean[key] = 1
        return mean

    def _adapt_clipping_norm(self, unclipped: int, sites: int) -> None:
        assert self.adaptive is not None
        noised_share = (unclipped + self.rng.normal(0.0, self.adaptive.count_noise_std)) / sites
        self.clipping_norm *= math.exp(
            -self.adaptive.learning_rate * (noised_share - self.adaptive.target_unclipped_quantile)
        )
