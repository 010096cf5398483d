"""The federation's global model: its initial weights and its model files (checkpoints, final model)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.run_config import AUTO_CLIPPING_NORM, RunConfig

if TYPE_CHECKING:
    from models.starting_model import StartingModel

FALLBACK_CLIPPING_NORM = 1.0
"""``dp-max-grad-norm`` when it is left to the starting model but there is none to measure it from."""


def initial_state_dict(config: RunConfig) -> dict[str, Any]:
    """Random initial weights of the configured network, from the run seed."""
    from models.networks import build_network

    return build_network(config.network_config(), seed=config.seed).state_dict()


def starting_weights(
    config: RunConfig, plan: Mapping[str, Any]
) -> tuple[dict[str, Any], StartingModel | None]:
    """The global model before round 1, and the starting model it came from.

    ``initial-model`` ``none`` gives random weights from the run seed (and no starting model); otherwise the
    starting model (models/starting_model.py), checked to be the run's network and protocol on the sites'
    preprocessing ``plan``.
    """
    from models.starting_model import load_starting_model

    starting = load_starting_model(config.initial_model)
    if starting is None:
        return initial_state_dict(config), None
    starting.check_fits(config.network_config().to_dict(), config.protocol, plan)
    return dict(starting.state_dict), starting


def starting_point(
    config: RunConfig, plan: Mapping[str, Any]
) -> tuple[dict[str, Any], RunConfig, dict[str, Any]]:
    """What round 1 starts from: the weights (`starting_weights`), the run config with its clipping norm
    resolved (`with_clipping_norm`: fixed before round 1 and stored, so every site and a resumed run use
    it), and what config.json records of both."""
    state_dict, starting = starting_weights(config, plan)
    config, clipping = with_clipping_norm(config, starting)
    described = starting.describe() if starting is not None else None
    return state_dict, config, {"starting_model": described, "dp_clipping": clipping}


def with_clipping_norm(config: RunConfig, starting: StartingModel | None) -> tuple[RunConfig, dict[str, Any]]:
    """``config`` with ``dp-max-grad-norm`` resolved (contract/run_config.py `AUTO_CLIPPING_NORM`), and a
    record of the value and where it came from."""
    if config.dp_max_grad_norm != AUTO_CLIPPING_NORM:
        return config, {"norm": config.dp_max_grad_norm, "source": "run setting dp-max-grad-norm"}
    measured = starting.public_gradient_norm(config.trainable_layers) if starting is not None else None
    if measured is None:
        return config.replace(dp_max_grad_norm=FALLBACK_CLIPPING_NORM), {
            "norm": FALLBACK_CLIPPING_NORM,
            "source": "no public gradient norms (no starting model, or none measured): the fallback",
        }
    norm = float(f"{measured:.3g}")
    return config.replace(dp_max_grad_norm=norm), {
        "norm": norm,
        "source": f"median per-patch gradient norm of the starting model's {config.trainable_layers!r} layers "
        "on public data",
    }


def federated_provenance(config: RunConfig) -> dict[str, Any]:
    """How a global model of this run was trained, as its model file records it."""
    from models.model_file import PATCH_SIZE_KEY

    return {
        "kind": "federated",
        "strategy": config.strategy,
        "rounds": config.num_rounds,
        "local_steps": config.local_steps,
        "seed": config.seed,
        "dp": config.dp,
        "initial_model": config.initial_model,
        "run_dir": str(config.run_dir),
        PATCH_SIZE_KEY: [config.patch_size] * 3,
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
        postprocessing=config.postprocessing,
    )


def read_model_state(path: Path) -> dict[str, Any]:
    """The state dict in a model file written by `write_model_file`."""
    from models.model_file import load_model

    return load_model(path).model.state_dict()
