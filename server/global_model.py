"""The federation's global model: its initial weights and its model files (checkpoints, final model)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from contract.run_config import RunConfig


def initial_state_dict(config: RunConfig) -> dict[str, Any]:
    """The global model before round 1: the configured network, initialised from the run seed."""
    from models.networks import build_network

    return build_network(config.network_config(), seed=config.seed).state_dict()


def federated_provenance(config: RunConfig) -> dict[str, Any]:
    """How a global model of this run was trained, as its model file records it."""
    return {
        "kind": "federated",
        "strategy": config.strategy,
        "rounds": config.num_rounds,
        "local_steps": config.local_steps,
        "seed": config.seed,
        "dp": config.dp,
        "run_dir": str(config.run_dir),
    }


def write_model_file(
    path: Path, state_dict: Mapping[str, Any], config: RunConfig, plan: Mapping[str, Any]
) -> None:
    """Write a self-describing model file (models/model_file.py) of a global model of this run."""
    from models.label_protocols import get_protocol
    from models.model_file import save_model

    save_model(
        path,
        dict(state_dict),
        network=config.network_config(),
        protocol=get_protocol(config.protocol),
        plan=dict(plan),
        training=federated_provenance(config),
    )


def read_model_state(path: Path) -> dict[str, Any]:
    """The state dict in a model file written by `write_model_file`."""
    from models.model_file import load_model

    return load_model(path).model.state_dict()
