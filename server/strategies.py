"""Server strategies: Flower's FedAvg, FedProx, FedAdam, FedYogi, and FedBN-style personalisation.

Aggregation itself is Flower's (`flwr.serverapp.strategy`); this module picks and configures a
strategy from the run config, adds the personalised variant, and saves/restores the state a strategy
carries between rounds so a run can be resumed.

What each strategy asks of the sites travels in the train/evaluate ConfigRecord:

- ``proximal-mu`` (FedProx, set by Flower): weight of the proximal term in the site's loss.
- ``personal-layers`` = ``"norm"`` (FedBN): the site keeps its normalization-layer parameters between
  rounds and sends only the other arrays; ``evaluate-personal`` = True: sites also evaluate their
  personalised model (global arrays + their own normalization layers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy
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
        return FedAvg(**common)
    if config.strategy == "fedprox":
        return FedProx(**common, proximal_mu=config.proximal_mu)
    if config.strategy == "fedadam":
        return FedAdam(**common, eta=config.server_learning_rate, eta_l=config.learning_rate)
    if config.strategy == "fedyogi":
        return FedYogi(**common, eta=config.server_learning_rate, eta_l=config.learning_rate)
    if config.strategy == "fedbn":
        return FedBN(**common)
    raise ValueError(f"unknown strategy {config.strategy!r}")  # RunConfig validated it


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What ``strategy`` carries from one round to the next, as tensors (for ``torch.save``).

    FedAdam/FedYogi: the first and second moments ``m_t`` / ``v_t`` (name -> tensor, same shapes as
    the model's arrays). FedAvg, FedProx and FedBN carry nothing between rounds.
    """
    import torch

    if not isinstance(strategy, FedOpt):
        return {}
    state: dict[str, Any] = {}
    for name in ("m_t", "v_t"):
        moments = getattr(strategy, name)
        if moments:
            state[name] = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in moments.items()}
    return state


def restore_strategy_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    """Put ``state`` (from `strategy_state`) back into a freshly made ``strategy``."""
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
