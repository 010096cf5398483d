"""The comparison models of a study evaluation: local-only and pooled baselines, FedBN's personal models.

Each baseline is the run's network, initialisation seed, patch size, batch size, learning rate,
augmentation and preprocessing plan, trained centrally with one optimizer for the budget of
`budget_rule`, and saved as a model file under the run's ``baselines/`` folder. Scored by
study/study_evaluation.py.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.progress import SHORT_STEPS_LINES, Progress
from contract.evaluation import POOLED, local_model_name
from contract.run_config import RunConfig
from contract.run_layout import BASELINES_DIR, SITE_STATE_DIR
from contract.wire import ROLE_TRAIN
from models.errors import NeurofedError
from study.study_sites import StudySite


@dataclass(frozen=True)
class ComparisonModel:
    """One trained baseline: its evaluation.json name, model, provenance and file (relative to the run)."""

    name: str
    model: Any
    kind: str
    trained_on: list[str]
    steps: int
    losses: Sequence[float]
    file: str


def budget_rule(num_rounds: int, local_steps: int, n_training_sites: int) -> dict[str, Any]:
    """Optimizer steps of each comparison model, from the run's rounds, local steps and training sites."""
    per_site = num_rounds * local_steps
    return {
        "rule": (
            "local-only: rounds x local_steps steps on the site's training split (what that site ran in "
            "the federation); pooled: rounds x local_steps x n_training_sites steps on all training "
            "splits (the federation's total compute); same network, seed, patch, batch, learning rate"
        ),
        "federated_steps_per_site": per_site,
        "federated_steps_total": per_site * n_training_sites,
        "local_only_steps": per_site,
        "pooled_steps": per_site * n_training_sites,
    }


def _baseline_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def train_baseline(
    settings: RunConfig,
    subjects: Sequence[tuple[str, np.ndarray, np.ndarray]],
    steps: int,
    name: str,
    step_hook: Callable[[int, float], None] | None = None,
):
    """A network trained centrally for ``steps`` steps on ``subjects``, from the run's starting weights and
    training the run's trainable layers, as every site does."""
    from client.site_model import run_training_config
    from models.trainable import freeze_except
    from models.training import train_steps

    model = starting_network(settings)
    freeze_except(model, settings.trainable_layers)
    config = run_training_config(settings)
    result = train_steps(
        model,
        [(image, label) for _, image, label in subjects],
        config,
        steps,
        rng=_baseline_rng(settings.seed, name),
        step_hook=step_hook,
    )
    return model, result


def starting_network(settings: RunConfig):
    """The run's network with the weights its federation started from (``initial-model``): the starting
    model, checked to fit the run, or random weights from the run seed."""
    from client.site_data import run_preprocessing_plan
    from client.site_model import build_model
    from models.starting_model import load_starting_model

    model = build_model(settings)
    starting = load_starting_model(settings.initial_model)
    if starting is not None:
        plan = run_preprocessing_plan(settings).to_dict()
        starting.check_fits(settings.network_config().to_dict(), settings.protocol, plan)
        model.load_state_dict(dict(starting.state_dict))
    return model


def _save_baseline(path: Path, model, settings: RunConfig, provenance: dict[str, Any]) -> None:
    from client.site_data import run_preprocessing_plan
    from models.label_protocols import get_protocol
    from models.model_file import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(
        path,
        model.state_dict(),
        network=settings.network_config(),
        protocol=get_protocol(settings.protocol),
        plan=run_preprocessing_plan(settings).to_dict(),
        training=provenance,
        postprocessing=settings.postprocessing,
    )


def train_comparison_models(
    run_dir: Path,
    settings: RunConfig,
    trainers: Sequence[StudySite],
    budget: dict[str, Any],
    *,
    progress: bool = True,
) -> list[ComparisonModel]:
    """Train and save each training site's local-only model, then the pooled one (``budget_rule``'s steps).

    ``progress``: one phase per model, its optimizer steps the steps (common/progress.py).

    Raises:
        NeurofedError: when a model's training split is empty (the models before it are saved).
    """
    from models.model_file import PATCH_SIZE_KEY

    out = []
    plans = [(local_model_name(s.site_id), [s], budget["local_only_steps"]) for s in trainers]
    plans.append((POOLED, trainers, budget["pooled_steps"]))
    for name, on_sites, steps in plans:
        subjects = [subject for s in on_sites for subject in s.train]
        if not subjects:
            raise NeurofedError(f"{name}: the training split is empty; the site needs more subjects")
        with Progress(f"training {name}", steps, show=progress, lines=SHORT_STEPS_LINES) as bar:
            model, result = train_baseline(
                settings, subjects, steps, name, step_hook=lambda _i, loss: bar.advance(f"loss {loss:.3f}")
            )
        file_name = (
            f"{BASELINES_DIR}/pooled.pt"
            if name == POOLED
            else f"{BASELINES_DIR}/local-{on_sites[0].site_id}.pt"
        )
        provenance = {
            "kind": "pooled" if name == POOLED else "local-only",
            "sites": [s.site_id for s in on_sites],
            "train_subjects": len(subjects),
            "steps": int(result.steps),
            "seed": settings.seed,
            "budget_rule": budget["rule"],
            "run_dir": str(run_dir),
            "dp": False,
            "initial_model": settings.initial_model,
            "trainable_layers": settings.trainable_layers,
            PATCH_SIZE_KEY: [settings.patch_size] * 3,
        }
        _save_baseline(run_dir / file_name, model, settings, provenance)
        out.append(
            ComparisonModel(
                name=name,
                model=model,
                kind=provenance["kind"],
                trained_on=provenance["sites"],
                steps=int(result.steps),
                losses=result.losses,
                file=file_name,
            )
        )
    return out


def personalised_models(run_dir: Path, global_model, sites: Sequence[StudySite], num_rounds: int) -> dict:
    """FedBN: ``{site_id: (model, layers file relative to run_dir)}`` of each training site that kept
    normalization layers: the final global model with the site's layers of its last trained round (in
    a simulation they are in ``RUN_DIR/sites/<site>/``, client/site_state.py). A site without any is left
    out."""
    import copy

    import torch

    from client.site_setup import SiteSetup
    from client.site_state import personal_layers_path

    out = {}
    for site in sites:
        if site.role != ROLE_TRAIN:
            continue
        setup = SiteSetup(
            site.site_id, site.role, site.data_dir, None, run_dir / SITE_STATE_DIR / site.site_id, True
        )
        path = next(
            (p for r in range(num_rounds, 0, -1) if (p := personal_layers_path(setup, r)).is_file()), None
        )
        if path is None:
            continue
        model = copy.deepcopy(global_model)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
        out[site.site_id] = (model, str(path.relative_to(run_dir)))
    return out
