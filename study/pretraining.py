"""`neurofed pretrain`: a public starting model, trained on domain-randomized subjects of public anatomy only.

The network, plan and protocol are the run's (contract/run_config.py `RunConfig`, defaults unless given), so
the model can start any federation of that configuration. The anatomy is the built-in phantom and any folders
of public label maps (study/public_anatomy.py); images are generated on the fly with random contrast,
resolution, artefacts and field of view (study/domain_randomization.py, study/randomized_patches.py). No
site's data is touched: the model file records ε = 0 for every site, the generator's settings and the content
hash of every anatomy it saw (models/starting_model.py reads that back).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.progress import Progress
from contract.run_config import RunConfig
from models.errors import NeurofedError
from models.starting_model import PRETRAINED_KIND
from study.domain_randomization import GeneratorSettings, randomized_subject
from study.public_anatomy import Anatomy, public_anatomy
from study.randomized_patches import RandomizedPatches, StreamSettings

VALIDATION_STREAM = 9
"""First spawn-key element of the held-out validation subjects' streams."""


@dataclass(frozen=True)
class PretrainingSetup:
    """Everything that decides a pretraining run; written into the model file.

    Attributes:
        steps: optimizer steps.
        batch_size: patches per step.
        learning_rate: Adam's peak step size; a linear warm-up over ``warmup_steps``, then cosine decay to
            ``final_learning_rate_fraction`` of it.
        workers: DataLoader processes generating subjects (0: in the training process).
        phantoms: distinct built-in phantom anatomies.
        validation_subjects: held-out randomized subjects (unseen phantoms) scored every ``validate_every`` steps.
        seed: initial weights, phantoms, every random draw.
    """

    steps: int = 6000
    batch_size: int = 4
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    final_learning_rate_fraction: float = 0.05
    workers: int = 1
    phantoms: int = 24
    validation_subjects: int = 4
    validate_every: int = 500
    seed: int = 0
    stream: StreamSettings = field(default_factory=StreamSettings)
    generator: GeneratorSettings = field(default_factory=GeneratorSettings)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "validation_subjects"):
            if getattr(self, name) < 1:
                raise NeurofedError(f"pretraining: {name} must be >= 1, got {getattr(self, name)}")
        if self.phantoms < 1:
            raise NeurofedError(f"pretraining: --phantoms must be >= 1 (the built-in phantom is always used), got {self.phantoms}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["generator"] = self.generator.to_dict()
        return d

    def learning_rate_at(self, step: int) -> float:
        """The step size of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        low = self.final_learning_rate_fraction
        return self.learning_rate * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def validation_subjects(setup: PretrainingSetup, plan, protocol) -> list[tuple[np.ndarray, np.ndarray]]:
    """Held-out randomized subjects: phantoms never used for training, each with its own random scanner."""
    subjects = []
    for i in range(setup.validation_subjects):
        anatomy = Anatomy(f"validation-phantom-{i}", phantom_seed=setup.seed + 1, phantom_index=10_000 + i)
        labels, affine = anatomy.load()
        k = 0
        while True:  # a draw preprocessing cannot use (e.g. a crop that left no brain) is drawn again
            rng = np.random.default_rng(np.random.SeedSequence(setup.seed, spawn_key=(VALIDATION_STREAM, i, k)))
            try:
                subjects.append(randomized_subject(labels, affine, setup.generator, plan, protocol, rng))
                break
            except NeurofedError:
                k += 1
    return subjects


def validation_scores(
    model: torch.nn.Module, subjects, protocol, patch_size: int, spacing_mm: tuple[float, ...]
) -> dict[str, float]:
    """Mean Dice over the foreground classes and the Dice + cross-entropy loss on whole held-out subjects."""
    from models.inference import predict_volume
    from models.metrics import segmentation_metrics
    from models.postprocessing import NO_POSTPROCESSING, predicted_labels

    model.eval()
    dice, losses = [], []
    for image, label in subjects:
        probabilities = predict_volume(model, image, (patch_size,) * 3)
        # The starting model is chosen on its network alone: a run adds its own post-processing.
        prediction = predicted_labels(probabilities, NO_POSTPROCESSING)
        scores = segmentation_metrics(prediction, label, protocol.class_names, spacing_mm)
        dice.append(np.mean([scores[n]["dice"] for n in protocol.class_names[1:]]))
        picked = np.take_along_axis(probabilities, label[None].astype(np.int64), axis=0)
        losses.append(float(-np.log(np.clip(picked, 1e-6, 1.0)).mean()))
    model.train()
    return {"dice": float(np.mean(dice)), "cross_entropy": float(np.mean(losses))}


def public_gradient_norms(
    model: torch.nn.Module, patches, loss_fn, count: int = 32
) -> dict[str, dict[str, float]]:
    """Quantiles of the per-patch gradient norm of ``model`` on ``count`` public patches, per trainable-layer
    subset (models/trainable.py): what a DP run's clipping norm is set from (``dp-max-grad-norm`` 0), at no
    privacy cost since no site's data is involved."""
    from models.trainable import TRAINABLE_LAYERS, trainable_names

    subsets = {layers: trainable_names(model, layers) for layers in TRAINABLE_LAYERS}
    norms: dict[str, list[float]] = {layers: [] for layers in subsets}
    model.train()
    for (image, label), _ in zip(patches, range(count), strict=False):
        model.zero_grad(set_to_none=True)
        loss_fn(model(image[None]), label[None]).backward()
        squares = {n: float(p.grad.pow(2).sum()) for n, p in model.named_parameters() if p.grad is not None}
        for layers, names in subsets.items():
            norms[layers].append(float(np.sqrt(sum(squares.get(n, 0.0) for n in names))))
    model.zero_grad(set_to_none=True)
    return {
        layers: {f"p{q}": float(np.percentile(values, q)) for q in (10, 25, 50, 75, 90)}
        for layers, values in norms.items()
    }


def pretrain(
    output: Path,
    label_map_dirs: Sequence[Path],
    setup: PretrainingSetup,
    run: RunConfig | None = None,
    *,
    progress: bool = True,
) -> dict:
    """Train the run's network on randomized public anatomy and write a starting-model file at ``output``.

    Returns:
        The provenance written into the model file (``training``).
    """
    from client.site_data import run_preprocessing_plan
    from client.site_model import build_model, run_training_config
    from models.label_protocols import get_protocol
    from models.model_file import save_model
    from models.training import make_loss, make_optimizer, training_step

    run = run or RunConfig()
    if not output.parent.is_dir():
        raise NeurofedError(f"-o {output}: folder {output.parent} does not exist; create it first")
    protocol = get_protocol(run.protocol)
    plan = run_preprocessing_plan(run)
    training = dataclasses.replace(run_training_config(run), batch_size=setup.batch_size, seed=setup.seed)
    phantoms, label_maps = public_anatomy(label_map_dirs, setup.phantoms, setup.seed)
    stream = RandomizedPatches(
        phantoms, label_maps, setup.generator, setup.stream, training, plan, protocol, setup.seed
    )
    loader = torch.utils.data.DataLoader(
        stream, batch_size=setup.batch_size, num_workers=setup.workers, persistent_workers=setup.workers > 0
    )
    # The generating workers use their own cores; training gets the rest (never more than it had).
    torch.set_num_threads(min(torch.get_num_threads(), max(1, (os.cpu_count() or 1) - setup.workers)))
    model = build_model(run.replace(seed=setup.seed))
    optimizer = make_optimizer(model, training)
    loss_fn = make_loss()
    held_out = validation_subjects(setup, plan, protocol)
    history = [{"step": 0, **validation_scores(model, held_out, protocol, run.patch_size, plan.target_spacing_mm)}]
    losses: list[float] = []
    started = time.perf_counter()
    with Progress("pretraining", setup.steps, show=progress, lines=100) as bar:
        for step, batch in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = setup.learning_rate_at(step)
            losses.append(training_step(model, batch, loss_fn, optimizer))
            bar.advance(f"loss {np.mean(losses[-50:]):.3f}")
            if (step + 1) % setup.validate_every == 0 or step + 1 == setup.steps:
                scores = validation_scores(model, held_out, protocol, run.patch_size, plan.target_spacing_mm)
                history.append({"step": step + 1, "train_loss": float(np.mean(losses[-100:])), **scores})
                bar.note(
                    f"step {step + 1}: held-out Dice {scores['dice']:.3f}, cross-entropy {scores['cross_entropy']:.3f}"
                )
            if step + 1 == setup.steps:
                break
    seconds = time.perf_counter() - started
    measuring = RandomizedPatches(
        phantoms, label_maps, setup.generator, setup.stream, training, plan, protocol, setup.seed + 1
    )
    gradient_norms = public_gradient_norms(model, iter(measuring), loss_fn)
    provenance = {
        "kind": PRETRAINED_KIND,
        "public_data_only": True,
        "site_epsilon": 0.0,
        "privacy": "trained on public anatomy only (built-in phantoms and public label maps): no site's data, "
        "ε = 0 for every site",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "setup": setup.to_dict(),
        "training_config": training.to_dict(),
        "anatomy": [a.record() for a in phantoms + label_maps],
        "validation": history,
        "public_gradient_norms": gradient_norms,
        "cpu_count": os.cpu_count(),
    }
    save_model(
        output, model.state_dict(), network=run.network_config(), protocol=protocol, plan=plan.to_dict(),
        training=provenance,
    )
    return provenance
