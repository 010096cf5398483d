"""Local training of a segmentation network on patches of preprocessed subjects, and its evaluation.

A subject is ``(image, label)``: image ``(C, X, Y, Z)`` float32 z-scored, label ``(X, Y, Z)`` uint8 class
indices of a label protocol, on the same grid. Training draws patches (``PatchDataset``), and
``training_step`` does one optimizer step on a batch of them. ``train_steps`` runs a fixed number of
steps, as a federated round asks; a DP-SGD wrapper (Opacus ``make_private`` with a Poisson-sampling
DataLoader over a ``PatchDataset``) drives the same ``training_step``.

Everything random comes from the seed: the same seed, model weights and data give the same weights after
``train_steps``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.plain_records import from_known_dict
from models.augmentation import AugmentationConfig, augment_patch, left_right_permutation
from models.errors import NeurofedError
from models.inference import WINDOWS_PER_PASS
from models.label_protocols import LabelProtocol
from models.patch_sampling import check_subject, choose_patch_start, class_locations, crop_patch, pad_to_patch
from models.postprocessing import NO_POSTPROCESSING

Subject = tuple[np.ndarray, np.ndarray]
"""``(image (C, X, Y, Z) float32, label (X, Y, Z) integer class indices)``."""

OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")


@dataclass(frozen=True)
class TrainingConfig:
    """How a site trains locally; stored with runs and model files.

    Attributes:
        patch_size: training patch ``(X, Y, Z)`` in voxels; multiples of the network's total stride.
        batch_size: patches per optimizer step.
        learning_rate: optimizer step size.
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty coefficient.
        foreground_share: share of patches centred on a voxel of a randomly chosen foreground class.
        augment: whether to apply ``augmentation`` to training patches.
        augmentation: random transform settings (see ``models.augmentation``).
        seed: seed of patch sampling, augmentation and dropout.
    """

    patch_size: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 2
    learning_rate: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 1e-5
    foreground_share: float = 0.5
    augment: bool = True
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        patch = tuple(int(p) for p in self.patch_size)
        object.__setattr__(self, "patch_size", patch)
        if isinstance(self.augmentation, Mapping):
            object.__setattr__(self, "augmentation", AugmentationConfig.from_dict(self.augmentation))
        problems = []
        if len(patch) != 3 or min(patch) < 1:
            problems.append(f"patch_size {patch} must be three positive sizes")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate} must be > 0")
        if not 0.0 <= self.foreground_share <= 1.0:
            problems.append(f"foreground_share={self.foreground_share} must be in [0, 1]")
        if problems:
            raise NeurofedError("invalid training configuration: " + "; ".join(problems))

    @classmethod
    def for_protocol(cls, protocol: LabelProtocol, **changes: object) -> TrainingConfig:
        """A config whose augmentation mirrors left/right with ``protocol``'s hemisphere permutation."""
        config = cls(**changes)
        augmentation = replace(
            config.augmentation, left_right_permutation=left_right_permutation(protocol.class_names)
        )
        return replace(config, augmentation=augmentation)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["augmentation"] = self.augmentation.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainingConfig:
        return from_known_dict(cls, d, "training configuration", NeurofedError)


class PatchDataset(Dataset):
    """Training patches drawn from subjects; item ``i`` depends only on the seed and ``i``.

    Items come in epochs of ``len(subjects)``: each epoch visits every subject once, in an order shuffled
    by ``(seed, epoch)``, so subjects contribute equally and a short round does not always see the same
    ones. A patch's position and augmentation are drawn from a generator seeded with ``(seed, i)``, so
    items are reproducible in any order and in DataLoader worker processes.

    Each item is ``(image, label)``: image ``(C, *patch_size)`` float32, label ``(1, *patch_size)`` int64.
    """

    def __init__(
        self,
        subjects: Sequence[Subject],
        patch_size: Sequence[int],
        *,
        length: int,
        seed: int,
        foreground_share: float = 0.5,
        augmentation: AugmentationConfig | None = None,
    ) -> None:
        if not subjects:
            raise NeurofedError("no training subjects: the site has no usable preprocessed subject")
        for i, (image, label) in enumerate(subjects):
            check_subject(np.asarray(image), np.asarray(label), i)
        self.subjects = subjects
        self.patch_size = tuple(int(p) for p in patch_size)
        self.length = int(length)
        self.seed = int(seed)
        self.foreground_share = float(foreground_share)
        self.augmentation = augmentation
        self._prepared: dict[int, tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]] = {}
        self._epoch_orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.length

    def subject_of(self, index: int) -> int:
        """The subject item ``index`` is cut from."""
        epoch, position = divmod(index, len(self.subjects))
        if epoch not in self._epoch_orders:
            self._epoch_orders[epoch] = np.random.default_rng([self.seed, 2, epoch]).permutation(
                len(self.subjects)
            )
        return int(self._epoch_orders[epoch][position])

    def _subject(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        # Padding and class locations are computed once per subject, when first needed.
        if index not in self._prepared:
            image, label = self.subjects[index]
            image, label = pad_to_patch(np.asarray(image), np.asarray(label), self.patch_size)
            rng = np.random.default_rng([self.seed, 1, index])
            self._prepared[index] = (image, label, class_locations(label, rng))
        return self._prepared[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, label, locations = self._subject(self.subject_of(index))
        rng = np.random.default_rng([self.seed, 0, index])
        start = choose_patch_start(
            label.shape, self.patch_size, rng, locations=locations, foreground_share=self.foreground_share
        )
        image_patch, label_patch = crop_patch(image, label, start, self.patch_size)
        if self.augmentation is not None:
            image_patch, label_patch = augment_patch(image_patch, label_patch, self.augmentation, rng)
        return (
            torch.from_numpy(np.array(image_patch, dtype=np.float32)),
            torch.from_numpy(np.array(label_patch, dtype=np.int64))[None],
        )

    @classmethod
    def from_config(
        cls, subjects: Sequence[Subject], config: TrainingConfig, *, length: int, seed: int
    ) -> PatchDataset:
        """The dataset ``config`` describes: its patch size, foreground share and augmentation."""
        return cls(
            subjects,
            config.patch_size,
            length=length,
            seed=seed,
            foreground_share=config.foreground_share,
            augmentation=config.augmentation if config.augment else None,
        )


def make_loss() -> torch.nn.Module:
    """Dice + cross-entropy on logits ``(B, K, X, Y, Z)`` and labels ``(B, 1, X, Y, Z)``; mean over the batch.

    Dice is computed per sample (not over the batch), so a sample's loss does not depend on the others,
    as per-sample gradients in DP-SGD require.
    """
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


def make_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names over ``model``'s trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def add_proximal_gradient_(
    model: torch.nn.Module, proximal_to: Mapping[str, torch.Tensor], proximal_mu: float
) -> None:
    """Add the gradient of FedProx's ``mu/2 * ||w - w_global||^2``, i.e. ``mu * (w - w_global)``, to ``p.grad``.

    ``proximal_to`` maps parameter names (as in the unwrapped model's ``state_dict``) to the global weights.
    Opacus' ``GradSampleModule`` prefix ``_module.`` is ignored. The term does not depend on data, so under
    DP-SGD it is added after the gradient was privatised (a DP optimizer overwrites ``p.grad`` in ``step``).
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            key = name.removeprefix("_module.")
            if key not in proximal_to:
                raise KeyError(f"proximal_to has no weights for parameter {key!r}")
            term = proximal_mu * (param - proximal_to[key].to(param.device, param.dtype))
            if param.grad is None:
                param.grad = term
            else:
                param.grad.add_(term)


def training_step(
    model: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    proximal_to: Mapping[str, torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
) -> float:
    """One optimizer step on a batch; returns the batch's loss (without the proximal term), NaN if empty.

    With an Opacus DPOptimizer the step is DP-SGD: per-sample gradients are clipped and noised, and the
    FedProx gradient (data-independent) is added after that. An empty batch, which Poisson sampling can
    draw, still takes a DP step (noise only, counted by the accountant); with a plain optimizer it is a no-op.

    Args:
        model: the network in train mode, or Opacus' ``GradSampleModule`` wrapping it.
        batch: images ``(B, C, X, Y, Z)`` float32 and labels ``(B, 1, X, Y, Z)`` int64 class indices.
        loss_fn: e.g. ``make_loss()``, mean over the batch.
        optimizer: e.g. ``make_optimizer(model, config)``, or an Opacus DPOptimizer.
        proximal_to / proximal_mu: FedProx global weights and coefficient (``mu = 0`` disables).
    """
    if proximal_mu > 0 and proximal_to is None:
        raise ValueError("proximal_mu > 0 needs proximal_to (the global weights)")
    device = next(model.parameters()).device
    images, labels = (t.to(device, non_blocking=True) for t in batch)
    optimizer.zero_grad(set_to_none=True)
    is_dp = _is_dp_optimizer(optimizer)
    if images.shape[0] == 0:
        if not is_dp:
            return math.nan
        # Opacus' clipping accepts zero-length per-sample gradients; the network itself cannot run on 0 samples.
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        loss_value = math.nan
    else:
        if images.ndim == 6:
            # (B, K, C, ...): K patches of each privacy unit (augmentation multiplicity). A DP wrapper keeps the
            # units apart (privacy/vmap_grad_sample.py); the loss is the mean over all B x K patches.
            logits = model(images) if _is_dp_optimizer(optimizer) else model(images.flatten(0, 1))
            logits, labels = logits.reshape(-1, *logits.shape[-4:]), labels.flatten(0, 1)
        else:
            logits = model(images)
        if int(labels.max()) >= logits.shape[1]:
            raise NeurofedError(
                f"labels contain class {int(labels.max())} but the network predicts {logits.shape[1]} classes: "
                "the subjects were prepared for another label protocol than the model; re-run preprocessing "
                "or build the network for this protocol"
            )
        loss = loss_fn(logits, labels)
        loss.backward()
        loss_value = float(loss.detach())
    if is_dp:
        # DPOptimizer.step() is pre_step() (clip, noise, scale, accountant hook) + the wrapped step; the
        # proximal gradient goes in between, since pre_step overwrites p.grad.
        if optimizer.pre_step():
            if proximal_mu > 0:
                add_proximal_gradient_(model, proximal_to, proximal_mu)
            optimizer.original_optimizer.step()
    else:
        if proximal_mu > 0:
            add_proximal_gradient_(model, proximal_to, proximal_mu)
        optimizer.step()
    return loss_value


def _is_dp_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is an Opacus DPOptimizer (checked by its interface: opacus is imported lazily)."""
    return hasattr(optimizer, "pre_step") and hasattr(optimizer, "original_optimizer")


@dataclass(frozen=True)
class TrainResult:
    """Outcome of ``train_steps``.

    Attributes:
        steps: optimizer steps taken.
        n_samples_seen: patches trained on (``steps * batch_size``).
        losses: loss of each step's batch (Dice + cross-entropy, without the proximal term).
        seconds: wall-clock duration.
    """

    steps: int
    n_samples_seen: int
    losses: list[float]
    seconds: float

    @property
    def mean_loss(self) -> float:
        """Mean of the finite ``losses`` (NaN when there is none)."""
        finite = [loss for loss in self.losses if math.isfinite(loss)]
        return float(np.mean(finite)) if finite else math.nan


def train_steps(
    model: torch.nn.Module,
    subjects: Sequence[Subject],
    config: TrainingConfig,
    steps: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    rng: np.random.Generator | None = None,
    step_hook: Callable[[int, float], None] | None = None,
    proximal_to: Mapping[str, torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place for exactly ``steps`` optimizer steps on patches of ``subjects``.

    Args:
        model: the network (on any device; batches follow it).
        subjects: ``(image (C, X, Y, Z) float32, label (X, Y, Z) integer)`` pairs.
        config: patch size, batch size, optimizer, sampling, augmentation and seed.
        steps: number of optimizer steps.
        optimizer: reuse one across calls to keep its state (Adam moments); default a new one.
        rng: draws this call's seed, so successive calls (federated rounds) see different patches;
            default ``config.seed`` (every call then samples the same patches).
        step_hook: called as ``step_hook(step_index, loss)`` after each step.
        proximal_to / proximal_mu: FedProx term ``mu/2 * ||w - w_global||^2`` (``mu = 0`` disables).
    """
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0")
    seed = config.seed if rng is None else int(rng.integers(0, 2**63 - 1))
    dataset = PatchDataset.from_config(subjects, config, length=steps * config.batch_size, seed=seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=0)
    loss_fn = make_loss()
    optimizer = optimizer if optimizer is not None else make_optimizer(model, config)
    device = next(model.parameters()).device
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    # Dropout draws from torch's RNG: seed a private copy of it, leaving the caller's untouched.
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        for step, batch in enumerate(loader):
            loss = training_step(
                model, batch, loss_fn, optimizer, proximal_to=proximal_to, proximal_mu=proximal_mu
            )
            losses.append(loss)
            if step_hook is not None:
                step_hook(step, loss)
    return TrainResult(
        steps=len(losses),
        n_samples_seen=len(losses) * config.batch_size,
        losses=losses,
        seconds=time.perf_counter() - started,
    )


def evaluate_subjects(
    model: torch.nn.Module,
    subjects: Sequence[Subject],
    class_names: Sequence[str],
    patch_size: Sequence[int],
    *,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    overlap: float = 0.5,
    sw_batch_size: int = WINDOWS_PER_PASS,
    postprocessing: str = NO_POSTPROCESSING,
) -> list[dict[str, dict[str, float]]]:
    """Segment each subject by sliding-window inference and score it against its label.

    Args:
        model: the network.
        subjects: ``(image (C, X, Y, Z) float32, label (X, Y, Z) integer)`` pairs.
        class_names: class index -> name (the protocol's ``class_names``).
        patch_size: sliding-window size ``(X, Y, Z)``, voxels; multiples of the network's total stride.
        spacing_mm: voxel size of the arrays ``(X, Y, Z)``, mm.
        overlap, sw_batch_size: see ``predict_volume``.
        postprocessing: the label maps' post-processing (models/postprocessing.py), as the run sets it.

    Returns:
        Per subject, in order, ``segmentation_metrics``' result: class name -> metric -> value.
    """
    from models.inference import predict_volume
    from models.metrics import segmentation_metrics
    from models.postprocessing import predicted_labels

    results = []
    for image, label in subjects:
        probabilities = predict_volume(model, image, patch_size, overlap=overlap, sw_batch_size=sw_batch_size)
        prediction = predicted_labels(probabilities, postprocessing)
        results.append(segmentation_metrics(prediction, np.asarray(label), class_names, spacing_mm))
    return results
