"""Server strategies: Flower's FedAvg, FedProx, FedAdam, FedYogi, and FedBN-style personalisation.

Aggregation itself is Flower's (`flwr.serverapp.strategy`); this module picks and configures a
strategy from the run config, adds the personalised variant, and saves/restores the state a strategy
carries between rounds so a run can be resumed.

What each strategy asks of the sites travels in the train/evaluate ConfigRecord:

- ``proximal-mu`` (FedProx, set by Flower): weight of the proximal term in the site's loss.
- ``personal-layers`` = ``"norm"`` (FedBN): the site keeps its normalization-layer parameters between
  rounds and sends only the other arrays; ``evaluate-personal`` = True: sites also evaluate their
  personalised model (global arrays + their own normalization layers).

Site-level DP (``server-dp``): Flower's server-side fixed or adaptive clipping wrapper around the chosen
strategy clips each site's update and noises the aggregate. `check_updates` is the sanity check every
update passes before any of this.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from server.run_config import RunConfig

PERSONAL_LAYERS_KEY = "personal-layers"
EVALUATE_PERSONAL_KEY = "evaluate-personal"


class FedBN(FedAvg):
    """FedAvg over every array except the normalization layers, which stay at the sites (FedBN).

    Sites reply with the arrays they share (all but their normalization layers); this strategy
    averages those, weighted by ``num-examples``, and keeps every other array of the global model as
    it was. The global model's normalization layers therefore keep their initial values (identity
    affine transform for InstanceNorm), which is what a site that never trained (the unseen site) uses.

    Reference: Li et al., FedBN: Federated Learning on Non-IID Features via Local Batch Normalization,
    ICLR 2021.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.current_arrays: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays
        config[PERSONAL_LAYERS_KEY] = "norm"
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[PERSONAL_LAYERS_KEY] = "norm"
        config[EVALUATE_PERSONAL_KEY] = True
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        shared, metrics = super().aggregate_train(server_round, replies)
        if shared is None or self.current_arrays is None:
            return shared, metrics
        merged = ArrayRecord({k: self.current_arrays[k] for k in self.current_arrays})
        for key, array in shared.items():
            merged[key] = array
        return merged, metrics


def make_strategy(config: RunConfig) -> Strategy:
    """The strategy ``config.strategy`` names, sampling every training site each round.

    Training messages go to the ``config.num_training_sites`` training sites (the caller hands
    ``configure_train`` a grid view without the holdout sites); evaluation goes to all
    ``config.num_sites`` sites.
    """
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": config.num_training_sites,
        "min_evaluate_nodes": config.num_sites,
        "min_available_nodes": config.num_training_sites,
    }
    if config.strategy == "fedavg":
        strategy: Strategy = FedAvg(**common)
    elif config.strategy == "fedprox":
        strategy = FedProx(**common, proximal_mu=config.proximal_mu)
    elif config.strategy == "fedadam":
        strategy = FedAdam(**common, eta=config.server_learning_rate, eta_l=config.learning_rate)
    elif config.strategy == "fedyogi":
        strategy = FedYogi(**common, eta=config.server_learning_rate, eta_l=config.learning_rate)
    elif config.strategy == "fedbn":
        strategy = FedBN(**common)
    else:
        raise ValueError(f"unknown strategy {config.strategy!r}")  # RunConfig validated it
    if config.server_dp == "fixed":
        return DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=config.server_dp_noise_multiplier,
            clipping_norm=config.server_dp_clipping_norm,
            num_sampled_clients=config.num_training_sites,
        )
    if config.server_dp == "adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            strategy,
            noise_multiplier=config.server_dp_noise_multiplier,
            num_sampled_clients=config.num_training_sites,
            initial_clipping_norm=config.server_dp_clipping_norm,
            # Flower's default (sites / 20) is too small for few sites: with the count noise equal to the
            # update noise, the update noise is 1.15 x the configured multiplier, and the two releases
            # together are private as one Gaussian mechanism with the configured multiplier.
            clipped_count_stddev=max(config.num_training_sites / 20, config.server_dp_noise_multiplier),
        )
    return strategy


def inner_strategy(strategy: Strategy) -> Strategy:
    """The aggregation strategy inside a DP wrapper (the strategy itself when it is not wrapped)."""
    while isinstance(
        strategy, DifferentialPrivacyServerSideFixedClipping | DifferentialPrivacyServerSideAdaptiveClipping
    ):
        strategy = strategy.strategy
    return strategy


def check_float_arrays(arrays: ArrayRecord) -> None:
    """Raise ValueError naming any non-floating-point array: site-level DP noises every array it sends.

    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) cannot carry Gaussian noise; the networks
    here use InstanceNorm without running statistics, which has none.
    """
    integer = [k for k, a in arrays.items() if not np.issubdtype(np.dtype(a.numpy().dtype), np.floating)]
    if integer:
        raise ValueError(f"site-level DP needs floating-point arrays only; these are not: {integer}")


@dataclass(frozen=True)
class UpdateCheck:
    """The sanity verdict on one site's update.

    Attributes:
        index: position of the reply in the list checked.
        norm: L2 norm of (site arrays - global arrays) over all arrays the site sent; NaN if not finite.
        reason: why the update is rejected, or None when it is accepted.
    """

    index: int
    norm: float
    reason: str | None

    @property
    def accepted(self) -> bool:
        return self.reason is None


def update_norm(site_arrays: ArrayRecord, global_arrays: ArrayRecord) -> float:
    """L2 norm of ``site - global`` over the arrays the site sent (float64); NaN if any value is NaN/Inf."""
    total = 0.0
    for key, array in site_arrays.items():
        site = np.asarray(array.numpy(), dtype=np.float64)
        if not np.all(np.isfinite(site)):
            return math.nan
        total += float(np.sum((site - np.asarray(global_arrays[key].numpy(), dtype=np.float64)) ** 2))
    return math.sqrt(total)


def check_updates(
    updates: Sequence[ArrayRecord], global_arrays: ArrayRecord, norm_limit: float
) -> list[UpdateCheck]:
    """Sanity of each site's update before aggregation.

    Rules: an update holding NaN or Inf, or an array the global model lacks, is rejected. With
    ``norm_limit`` > 0 and at least two finite updates, update ``i`` is rejected when its norm exceeds
    ``norm_limit`` x the median norm of the *other* finite updates (compared with the others, so one huge
    update cannot raise its own yardstick; with a median of 0 the rule is skipped).
    """
    norms: list[float] = []
    reasons: list[str | None] = []
    for arrays in updates:
        unknown = sorted(set(arrays) - set(global_arrays))
        if unknown:
            norms.append(math.nan)
            reasons.append(f"arrays not in the global model: {unknown[:5]}")
            continue
        norm = update_norm(arrays, global_arrays)
        norms.append(norm)
        reasons.append("update contains NaN or Inf values" if math.isnan(norm) else None)
    finite = [i for i, n in enumerate(norms) if math.isfinite(n)]
    if norm_limit > 0 and len(finite) >= 2:
        for i in finite:
            median = float(np.median([norms[j] for j in finite if j != i]))
            if median > 0 and norms[i] > norm_limit * median:
                reasons[i] = (
                    f"update norm {norms[i]:.4g} is more than {norm_limit:g} x the median norm of the other "
                    f"sites' updates ({median:.4g})"
                )
    return [UpdateCheck(i, norms[i], reasons[i]) for i in range(len(updates))]


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What ``strategy`` carries from one round to the next, as tensors (for ``torch.save``).

    FedAdam/FedYogi: the first and second moments ``m_t`` / ``v_t`` (name -> tensor, same shapes as
    the model's arrays). FedAvg, FedProx and FedBN carry nothing between rounds.
    """
    import torch

    state: dict[str, Any] = {}
    if isinstance(strategy, DifferentialPrivacyServerSideAdaptiveClipping):
        # The adaptive clipping norm moves every round; a resumed run continues from where it was.
        state["clipping_norm"] = torch.tensor(float(strategy.clipping_norm), dtype=torch.float64)
    strategy = inner_strategy(strategy)
    if not isinstance(strategy, FedOpt):
        return state
    for name in ("m_t", "v_t"):
        moments = getattr(strategy, name)
        if moments:
            state[name] = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in moments.items()}
    return state


def restore_strategy_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    """Put ``state`` (from `strategy_state`) back into a freshly made ``strategy``."""
    if isinstance(strategy, DifferentialPrivacyServerSideAdaptiveClipping) and "clipping_norm" in state:
        strategy.clipping_norm = float(state["clipping_norm"])
    strategy = inner_strategy(strategy)
    if not isinstance(strategy, FedOpt):
        return
    for name in ("m_t", "v_t"):
        if name in state:
            setattr(strategy, name, {k: v.numpy().copy() for k, v in state[name].items()})


def arrays_to_state_dict(arrays: ArrayRecord) -> dict[str, Any]:
    """Flower arrays -> torch state dict (CPU tensors, a copy)."""
    return arrays.to_torch_state_dict()


def state_dict_to_arrays(state_dict: Mapping[str, Any]) -> ArrayRecord:
    """torch state dict -> Flower arrays (a copy, in the state dict's order)."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in state_dict.items()})
