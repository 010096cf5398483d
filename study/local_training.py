"""Centralised training on one or more sites' data: the local-only and pooled baselines.

Every federated result is compared with a model trained on one site alone (local-only) and with a
model trained on all sites' training data pooled (pooled), with the same network and step budget.
This module trains those, holding out a validation split at every site that it scores as it goes.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.preprocessed_cache import PreprocessedCache
from client.preprocessing import PreprocessedSubject, PreprocessingPlan
from client.site_data import prepare_split_site
from client.site_split import seed_key
from common.progress import SHORT_STEPS_LINES, Progress
from contract.run_config import RunConfig
from models.errors import NeurofedError
from models.label_protocols import LabelProtocol
from models.postprocessing import check_postprocessing


@dataclass(frozen=True)
class LocalTrainingSetup:
    """Everything that decides a local/pooled training run; written into the model's provenance.

    Attributes:
        steps: optimizer steps in total.
        validation_fraction: share of each site's subjects held out for validation.
        validate_every: steps between two validation passes (0: only at the end).
        seed: seed of the split, the initial weights, patch sampling and augmentation.
        postprocessing: the label maps' post-processing (models/postprocessing.py) in validation, recorded in
            the model file for segmentation; a federated run's default.
    """

    steps: int = 300
    validation_fraction: float = 0.25
    validate_every: int = 100
    seed: int = 0
    postprocessing: str = RunConfig.postprocessing

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise NeurofedError(f"--steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise NeurofedError(f"validation fraction must be in [0, 1), got {self.validation_fraction}")
        if self.validate_every < 0:
            raise NeurofedError(f"validate_every must be >= 0, got {self.validate_every}")
        check_postprocessing(self.postprocessing, "--postprocessing")


@dataclass
class SiteSubjects:
    """One site's preprocessed subjects, split into training and validation."""

    name: str
    train: list[PreprocessedSubject]
    validation: list[PreprocessedSubject]


@dataclass
class TrainingHistory:
    """Losses per step and validation Dice (mean over foreground classes) at each validation pass."""

    losses: list[float] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)


def load_sites(
    data_dirs: Sequence[Path],
    plan: PreprocessingPlan,
    protocol: LabelProtocol,
    *,
    validation_fraction: float,
    seed: int,
    cache: PreprocessedCache | None = None,
    progress: bool = True,
) -> list[SiteSubjects]:
    """Prepare every site (validate, preprocess through the cache) and split it by subject."""
    if not data_dirs:
        raise NeurofedError("no site data folder given")
    cache = cache if cache is not None else PreprocessedCache()
    sites = []
    for data_dir in data_dirs:
        split = prepare_split_site(
            Path(data_dir),
            plan,
            protocol,
            test_fraction=validation_fraction,
            split_key=seed_key(seed),
            cache=cache,
            progress=progress,
        )
        sites.append(SiteSubjects(name=Path(data_dir).name, train=split.train, validation=split.test))
    return sites


def mean_foreground_dice(per_subject: Sequence[dict[str, dict[str, float]]]) -> float:
    """Mean over subjects and foreground classes of the Dice in ``segmentation_metrics`` results."""
    values = [m["dice"] for subject in per_subject for m in subject.values() if math.isfinite(m["dice"])]
    return float(np.mean(values)) if values else math.nan


def train_centralised(
    sites: Sequence[SiteSubjects],
    protocol: LabelProtocol,
    plan: PreprocessingPlan,
    network_config,
    training_config,
    setup: LocalTrainingSetup,
    *,
    initial_state: dict | None = None,
    on_validation: Callable[[int, float], None] | None = None,
    progress: bool = True,
):
    """Train one network on the pooled training subjects of ``sites``; return (model, history).

    With one site this is the local-only baseline, with all sites the pooled baseline. Validation
    scores every site's validation subjects with sliding-window inference every
    ``setup.validate_every`` steps and at the end. ``initial_state``: the starting model's weights (default:
    random weights from ``setup.seed``).
    """
    import torch

    from models.networks import build_network
    from models.training import evaluate_subjects, make_optimizer, train_steps

    train = [(s.image, s.label) for site in sites for s in site.train]
    validation = [(s.image, s.label) for site in sites for s in site.validation]
    if not train:
        raise NeurofedError("no training subject: every usable subject went to validation; add subjects")
    network_config.check_patch_size(training_config.patch_size)
    model = build_network(network_config, seed=setup.seed)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    optimizer = make_optimizer(model, training_config)
    rng = np.random.default_rng(setup.seed)
    history = TrainingHistory()
    chunk = setup.validate_every or setup.steps
    done = 0
    with Progress("training", setup.steps, show=progress, lines=SHORT_STEPS_LINES) as bar:
        while done < setup.steps:
            n = min(chunk, setup.steps - done)
            result = train_steps(
                model,
                train,
                training_config,
                n,
                optimizer=optimizer,
                rng=rng,
                step_hook=lambda _i, loss: bar.advance(f"loss {loss:.3f}"),
            )
            history.losses.extend(result.losses)
            done += n
            if validation:
                with torch.inference_mode():
                    per_subject = evaluate_subjects(
                        model,
                        validation,
                        protocol.class_names,
                        training_config.patch_size,
                        spacing_mm=plan.target_spacing_mm,
                        postprocessing=setup.postprocessing,
                    )
                dice = mean_foreground_dice(per_subject)
                history.validation.append({"step": done, "mean_dice": dice})
                bar.note(f"step {done}: validation mean Dice {dice:.3f}")
                if on_validation is not None:
                    on_validation(done, dice)
    return model, history


def training_provenance(
    sites: Sequence[SiteSubjects], setup: LocalTrainingSetup, history: TrainingHistory
) -> dict:
    """The provenance block stored in the model file."""
    return {
        "kind": "pooled" if len(sites) > 1 else "local-only",
        "run_id": uuid.uuid4().hex[:12],
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "sites": [s.name for s in sites],
        "train_subjects": sum(len(s.train) for s in sites),
        "validation_subjects": sum(len(s.validation) for s in sites),
        "rounds": None,
        "epsilon": None,
        "dp": False,
        "setup": {
            "steps": setup.steps,
            "validation_fraction": setup.validation_fraction,
            "validate_every": setup.validate_every,
            "seed": setup.seed,
            "postprocessing": setup.postprocessing,
        },
        "final_validation_mean_dice": history.validation[-1]["mean_dice"] if history.validation else None,
    }
