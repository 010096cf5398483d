"""Server strategies: Flower's FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, the robust FedMedian, FedTrimmedAvg,
Krum, MultiKrum and Bulyan, and FedBN-style personalisation.

Aggregation itself is Flower's (`flwr.serverapp.strategy`); this module picks and configures a
strategy from the run config, adds the personalised variant, and saves/restores the state a strategy
carries between rounds so a run can be resumed. Whatever the strategy, it only ever sees replies that
passed the screening of server/update_screening.py (the run's reply schema, the norm rules, capped
weights); `too_few_updates` says when a robust strategy has too few of them to withstand
``byzantine-sites`` malicious ones, and `round_aggregator` then hands the round to the coordinate-wise
median (or, with fewer than 2f + 1, leaves the global model as it was).

What each strategy asks of the sites travels in the train/evaluate ConfigRecord:

- ``proximal-mu`` (FedProx, set by Flower): weight of the proximal term in the site's loss.
- ``personal-layers`` = ``"norm"`` (FedBN): the site keeps its normalization-layer parameters between
  rounds and sends only the other arrays; ``evaluate-personal`` = True: sites also evaluate their
  personalised model (global arrays + their own normalization layers).

Site-level DP (``server-dp``): `server.site_level_dp.SiteLevelDP` around the chosen strategy clips each
site's update, averages the k accepted updates with weight 1/k each, adds Gaussian noise of std z·C/k and
lets the strategy take its server step on that; `server_dp_epsilon` is the ε of the rounds it released.
Every update passes the screening of server/update_screening.py before any of this.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from contract.reply_schema import declined_reply_schema, training_reply_schema
from contract.run_config import RunConfig, min_training_sites
from contract.wire import EVALUATE_PERSONAL_KEY, PERSONAL_LAYERS_KEY
from server.reply_checks import array_specs
from server.site_level_dp import AdaptiveClipping, SiteLevelDP
from server.update_screening import TrainingSchemas


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


class ServerMomentum(FedAvgM):
    """Flower's FedAvgM, its pseudo-gradient always taken from the global model the round's sites received.

    Flower's FedAvgM keeps the model it stepped from last; here a round whose aggregate was not released
    (site-level DP with too few sites) or a resumed run hands ``configure_train`` the global model anew,
    and the momentum must act on the update from that model. Reference: Hsu et al., Measuring the Effects
    of Non-Identical Data Distribution for Federated Visual Classification, 2019.
    """

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)


def sites_sampled_per_round(config: RunConfig) -> int:
    """Training sites asked to train each round: every one of ``config.num_training_sites``."""
    return config.num_training_sites


def site_sample_rate(config: RunConfig) -> float:
    """``q``: probability that a training site is asked to train in a round (sampled / available sites)."""
    return sites_sampled_per_round(config) / config.num_training_sites


_COMMON_SAMPLING: dict[str, Any] = {
    "fraction_train": 1.0,
    "fraction_evaluate": 1.0,
    "min_train_nodes": 1,
    "min_evaluate_nodes": 1,
    "min_available_nodes": 1,
}
"""Every strategy samples every node of the view it is handed (see `make_strategy`)."""


def make_strategy(config: RunConfig) -> Strategy:
    """The strategy ``config.strategy`` names, sampling every node of the grid view it is handed.

    The caller hands ``configure_train`` a grid view of the training sites that take part this round and
    ``configure_evaluate`` one of every site (server/site_replies.py `NodeView`), having waited for them
    itself: the strategy needs no minimum of its own (a revoked site leaves the view, and Flower's
    sampling would otherwise wait for it forever). With ``server-dp`` the strategy is wrapped in
    `SiteLevelDP`, which releases a round only with at least ``min-sites`` accepted updates (1 when
    ``min-sites`` is 0: the run then already stops when a site does not answer, and screening may still
    leave fewer).
    """
    common = dict(_COMMON_SAMPLING)
    if config.strategy in ROBUST_FACTORIES:
        return ROBUST_FACTORIES[config.strategy](config, common)
    if config.strategy == "fedavg":
        strategy: Strategy = FedAvg(**common)
    elif config.strategy == "fedprox":
        strategy = FedProx(**common, proximal_mu=config.proximal_mu)
    elif config.strategy == "fedavgm":
        strategy = ServerMomentum(
            **common, server_learning_rate=config.server_step_size(), server_momentum=config.server_momentum
        )
    elif config.strategy == "fedadam":
        strategy = FedAdam(**common, eta=config.server_step_size(), eta_l=config.learning_rate)
    elif config.strategy == "fedyogi":
        strategy = FedYogi(**common, eta=config.server_step_size(), eta_l=config.learning_rate)
    elif config.strategy == "fedbn":
        strategy = FedBN(**common)
    else:
        raise ValueError(f"unknown strategy {config.strategy!r}")  # RunConfig validated it
    if config.server_dp == "off":
        return strategy
    adaptive = None
    if config.server_dp == "adaptive":
        # Flower's default count noise (sites / 20) is too small for few sites: with it equal to the
        # noise multiplier, the mean's noise is 1.15 x the configured multiplier, and the two releases
        # together are private as one Gaussian mechanism with the configured multiplier.
        count_noise_std = max(sites_sampled_per_round(config) / 20, config.server_dp_noise_multiplier)
        adaptive = AdaptiveClipping(count_noise_std=count_noise_std)
    assert isinstance(strategy, FedAvg)
    return SiteLevelDP(
        strategy,
        noise_multiplier=config.server_dp_noise_multiplier,
        clipping_norm=config.server_dp_clipping_norm,
        min_sites=max(1, config.min_sites),
        adaptive=adaptive,
    )


ROBUST_FACTORIES: dict[str, Any] = {
    "fedmedian": lambda config, common: FedMedian(**common),
    "fedtrimmedavg": lambda config, common: FedTrimmedAvg(**common, beta=config.trimmed_fraction),
    "krum": lambda config, common: Krum(**common, num_malicious_nodes=config.byzantine_sites),
    "multikrum": lambda config, common: MultiKrum(
        **common,
        num_malicious_nodes=config.byzantine_sites,
        num_nodes_to_select=config.multikrum_selected
        or max(1, config.num_training_sites - config.byzantine_sites),
    ),
    "bulyan": lambda config, common: Bulyan(**common, num_malicious_nodes=config.byzantine_sites),
}
"""Flower's robust strategies, made from the run config and the common sampling settings."""


def too_few_updates(config: RunConfig, accepted: int) -> str | None:
    """Why ``accepted`` updates are too few for ``config.strategy`` to aggregate (None: enough)."""
    needed = min_training_sites(config.strategy, config.byzantine_sites)
    if accepted >= needed:
        return None
    return (
        f"{accepted} accepted update(s); {config.strategy} with byzantine-sites = {config.byzantine_sites} "
        f"needs at least {needed}"
    )


FALLBACK_STRATEGY = "fedmedian"
"""What aggregates a round whose screening left Krum, MultiKrum or Bulyan too few updates."""


def round_aggregator(
    strategy: Strategy, config: RunConfig, accepted: int
) -> tuple[Strategy | None, str | None]:
    """Who aggregates a round with ``accepted`` screened updates, and why it is not ``strategy`` itself.

    ``(strategy, None)`` when ``strategy`` can aggregate them. When the screening rejected updates and left
    Krum, MultiKrum or Bulyan fewer than they need (Bulyan: 4f + 3), the coordinate-wise median (which still
    withstands f malicious updates among 2f + 1) aggregates the round instead: otherwise one site whose
    update is rejected every round would freeze the global model. ``(None, reason)`` when even the median
    has too few (the global model stays as it was).
    """
    shortfall = too_few_updates(config, accepted)
    if shortfall is None:
        return strategy, None
    if config.strategy in ROBUST_FACTORIES and accepted >= 2 * config.byzantine_sites + 1:
        median = ROBUST_FACTORIES[FALLBACK_STRATEGY](config, dict(_COMMON_SAMPLING))
        return median, f"{shortfall}: aggregated by {FALLBACK_STRATEGY} instead"
    return None, f"{shortfall}, so the global model is unchanged"


def training_schemas(config: RunConfig, global_arrays: ArrayRecord) -> TrainingSchemas:
    """What a site may send back in a training round of this run (contract/reply_schema.py): exactly the
    global model's arrays, with their shapes and dtypes, except FedBN's normalization layers; the layers
    ``trainable-layers`` leaves frozen keep their global values."""
    kept: set[str] = set()
    frozen: set[str] = set()
    if config.strategy == "fedbn" or config.trainable_layers != "all":
        from models.networks import build_network, normalization_keys
        from models.trainable import trainable_names

        network = build_network(config.network_config())
        kept = normalization_keys(network) if config.strategy == "fedbn" else set()
        parameters = {name for name, _ in network.named_parameters()}
        frozen = parameters - trainable_names(network, config.trainable_layers)
    return TrainingSchemas(
        training=training_reply_schema(config, array_specs(global_arrays), kept, frozen),
        declined=declined_reply_schema(config),
        weights=config.aggregation_weights,
        norm_limit=config.update_norm_limit,
    )


def inner_strategy(strategy: Strategy) -> Strategy:
    """The aggregation strategy inside the site-level DP wrapper (the strategy itself when not wrapped)."""
    while isinstance(strategy, SiteLevelDP):
        strategy = strategy.strategy
    return strategy


def released_rounds(strategy: Strategy) -> int:
    """Rounds whose site-level DP aggregate ``strategy`` released (0 without site-level DP)."""
    return strategy.released_rounds if isinstance(strategy, SiteLevelDP) else 0


def unreleased_reason(strategy: Strategy, server_round: int) -> str | None:
    """Why ``strategy`` released no aggregate in ``server_round`` (None if it did, or has no such rule)."""
    return strategy.skipped_rounds.get(server_round) if isinstance(strategy, SiteLevelDP) else None


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What ``strategy`` carries from one round to the next, as tensors (for ``torch.save``).

    Site-level DP: ``released_rounds`` (its privacy count) and, with adaptive clipping, the current
    ``clipping_norm``. FedAvgM: its ``momentum`` (name -> tensor, the model's arrays' shapes). FedAdam/FedYogi:
    the first and second moments ``m_t`` / ``v_t`` (the same). FedAvg, FedProx and FedBN carry nothing
    between rounds.
    """
    import torch

    state: dict[str, Any] = {}
    if isinstance(strategy, SiteLevelDP):
        state["released_rounds"] = torch.tensor(strategy.released_rounds, dtype=torch.int64)
        if strategy.adaptive is not None:
            # The adaptive clipping norm moves every round; a resumed run continues from where it was.
            state["clipping_norm"] = torch.tensor(float(strategy.clipping_norm), dtype=torch.float64)
    strategy = inner_strategy(strategy)
    if isinstance(strategy, FedAvgM) and strategy.momentum_vector is not None:
        # Flower keeps the momentum as a list in the order of the model's arrays.
        keys = list(strategy.current_arrays.keys())
        momentum = zip(keys, strategy.momentum_vector, strict=True)
        state["momentum"] = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in momentum}
    if not isinstance(strategy, FedOpt):
        return state
    for name in ("m_t", "v_t"):
        moments = getattr(strategy, name)
        if moments:
            state[name] = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in moments.items()}
    return state


def restore_strategy_state(
    strategy: Strategy, state: Mapping[str, Any], *, completed_rounds: int = 0
) -> None:
    """Put ``state`` (from `strategy_state`) back into a freshly made ``strategy``.

    ``completed_rounds``: rounds the checkpoint holds. A checkpoint from before site-level DP counted its
    releases counts every one of them as released (never less ε than was spent).
    """
    if isinstance(strategy, SiteLevelDP):
        released = state.get("released_rounds")
        strategy.released_rounds = int(released) if released is not None else completed_rounds
        if strategy.adaptive is not None and "clipping_norm" in state:
            strategy.clipping_norm = float(state["clipping_norm"])
    strategy = inner_strategy(strategy)
    if isinstance(strategy, FedAvgM) and "momentum" in state:
        strategy.momentum_vector = [v.numpy().copy() for v in state["momentum"].values()]
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
    """Site-level ε (at ``dp-delta``) after ``releases`` rounds released by `SiteLevelDP`.

    Each released round is the Gaussian mechanism on the uniform mean of the k sites' clipped updates:
    sensitivity ``C/k`` (one site's update, k known), noise std ``z x C/k``, so noise multiplier
    ``z = server-dp-noise-multiplier`` whatever k is. Sites are sampled with rate `site_sample_rate`
    (1: every training site, every round); rounds are composed by the RDP accountant of
    privacy/accounting.py. Only released rounds count: a round skipped for too few sites releases nothing
    (a round with no accepted update stops the run). Adaptive clipping releases the mean and the unclipped count with
    noise chosen so that together they have the same ε (Andrew et al., 2021). Infinite without noise
    (once a round is released).
    """
    from privacy.accounting import epsilon_for

    return epsilon_for(releases, site_sample_rate(config), config.server_dp_noise_multiplier, config.dp_delta)
