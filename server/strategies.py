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
strategy clips each site's update and noises the aggregate. Every update passes the screening of
server/update_screening.py before any of this.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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

from contract.run_config import RunConfig
from contract.wire import EVALUATE_PERSONAL_KEY, PERSONAL_LAYERS_KEY


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


def server_dp_epsilon(config: RunConfig, releases: int) -> float:
    """Site-level ε (at ``dp-delta``) of ``releases`` noised aggregates of the server-side DP wrapper.

    Every training site takes part in every round (sample rate 1), and Flower's wrapper adds noise of std
    ``noise_multiplier x clipping_norm`` to the sum of clipped updates: the Gaussian mechanism, composed
    by the RDP accountant of privacy/accounting.py. Infinite without noise. Adaptive clipping splits the
    same privacy between the update and the clipped-count release (Andrew et al., 2021), so it has the
    same ε.
    """
    from privacy.accounting import epsilon_for

    if config.server_dp_noise_multiplier == 0:
        return float("inf")
    return epsilon_for(releases, 1.0, config.server_dp_noise_multiplier, config.dp_delta)
