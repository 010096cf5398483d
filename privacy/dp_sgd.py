"""DP-SGD for a site's local training: Opacus per-sample clipping, Gaussian noise and Poisson sampling.

``make_private_training`` turns a model, its optimizer and a dataset into their private counterparts (as
Opacus' ``PrivacyEngine.make_private`` does, but with the exact sampling rate ``batch_size / len(dataset)``
and an accountant that continues from a saved state), and ``PrivateTraining.run_steps`` runs a round's
optimizer steps through any step function. Works on any ``nn.Module`` whose loss is a mean of per-sample
losses; nothing here knows about images.

The privacy unit is an item of the dataset: Poisson sampling puts each item in a step's batch with
probability ``sample_rate`` and clipping bounds its influence. For subject-level privacy every subject must
be exactly one item; ``PrivacyUnitDataset`` presents a patch dataset that way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from common.plain_records import from_known_dict
from privacy.accounting import (
    accountant_state,
    check_privacy_parameters,
    history_epsilon,
    make_accountant,
    noise_multiplier_for_target,
)
from privacy.errors import PrivacyError

GRAD_SAMPLE_MODES: tuple[str, ...] = ("vmap", "functorch", "ghost", "hooks")
"""How per-sample gradients (or their norms) are obtained. Step time / plain step time measured by
bench/bench_dp_step.py (default network, 96^3 patches, batch 2, CPU, 2 threads): vmap 0.95, functorch
1.83, ghost 2.68, hooks 3.22.

- ``vmap`` (default): ``privacy.vmap_grad_sample.VmapGradSampleModule``: one vmapped forward/backward over
  per-sample views of the weights; nothing is computed twice.
- ``functorch``: Opacus ``GradSampleModule`` computing every layer's per-sample gradients with
  ``torch.func`` in backward hooks (re-runs each layer's forward and weight gradient).
- ``ghost``: Opacus fast gradient clipping: per-sample gradient norms in a first backward pass (ghost norms
  for linear layers, ``torch.func`` for the others, since Conv3d has no ghost norm), clipped gradients
  in a second backward pass of the re-weighted loss; never keeps the whole model's per-sample gradients.
- ``hooks``: Opacus' original per-layer formulas (for convolutions it unfolds the input: slow, and
  memory-hungry in 3D).
"""

StepFunction = Callable[[nn.Module, Any, Callable, torch.optim.Optimizer], float]
"""``step_fn(model, batch, loss_fn, optimizer) -> loss``: one optimizer step on a batch (e.g.
``models.training.training_step``); must handle the empty batches Poisson sampling can draw."""


@dataclass(frozen=True)
class DPConfig:
    """How a site trains with differential privacy (sample-level DP-SGD); stored with runs.

    Attributes:
        enabled: DP-SGD on (the default) or off; off must be chosen explicitly and reports say so.
        noise_multiplier: Gaussian noise std divided by ``max_grad_norm``. When set it replaces
            ``target_epsilon`` (which is then ``None``).
        target_epsilon: ε the whole run may spend at ``delta``; the noise multiplier is derived from it for
            the run's planned steps (rounds x local steps). Used when ``noise_multiplier`` is not set.
        max_grad_norm: L2 clipping norm of each sample's gradient (all parameters together).
        delta: δ of (ε, δ)-DP, per run; well below 1 / number of subjects.
        grad_sample_mode: one of ``GRAD_SAMPLE_MODES``.
        poisson_sampling: sample each batch by including every item independently, as the accountant
            assumes; ``make_private_training`` refuses ``False``, for which the reported ε would not hold.
        secure_mode: draw noise and samples from a cryptographically secure generator (needs torchcsprng).
    """

    enabled: bool = True
    noise_multiplier: float | None = None
    target_epsilon: float | None = 8.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    grad_sample_mode: str = "vmap"
    poisson_sampling: bool = True
    secure_mode: bool = False

    def __post_init__(self) -> None:
        if self.noise_multiplier is not None:
            object.__setattr__(self, "target_epsilon", None)
        problems = []
        if self.noise_multiplier is None and self.target_epsilon is None:
            problems.append("set noise_multiplier or target_epsilon")
        if self.noise_multiplier is not None and not (
            self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)
        ):
            problems.append(f"noise_multiplier={self.noise_multiplier} must be > 0 (0 gives no privacy)")
        if self.target_epsilon is not None and not (
            self.target_epsilon > 0 and math.isfinite(self.target_epsilon)
        ):
            problems.append(f"target_epsilon={self.target_epsilon} must be a finite number > 0")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            problems.append(f"max_grad_norm={self.max_grad_norm} must be > 0")
        if not 0.0 < self.delta < 1.0:
            problems.append(f"delta={self.delta} must be in (0, 1), e.g. 1e-5")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            problems.append(
                f"grad_sample_mode {self.grad_sample_mode!r} is not one of {', '.join(GRAD_SAMPLE_MODES)}"
            )
        if problems:
            raise PrivacyError("invalid differential privacy configuration: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> DPConfig:
        """Inverse of ``to_dict``; unknown keys raise PrivacyError naming them."""
        return from_known_dict(cls, d, "DP configuration", PrivacyError)

    def resolve_noise_multiplier(self, sample_rate: float, planned_steps: int | None) -> float:
        """The noise multiplier to train with: the configured one, or the one meeting ``target_epsilon``.

        Args:
            sample_rate: probability that a privacy unit is in a step's batch.
            planned_steps: all steps of the run (rounds x local steps); needed for a target ε. The same
                plan gives the same noise multiplier, so a resumed run keeps its noise.
        """
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        if planned_steps is None:
            raise PrivacyError(
                f"target_epsilon={self.target_epsilon} needs the run's planned number of steps "
                "(rounds x local steps) to derive the noise multiplier"
            )
        return noise_multiplier_for_target(self.target_epsilon, self.delta, sample_rate, planned_steps)


class PrivacyUnitDataset(Dataset):
    """One item per privacy unit (subject), drawing a fresh item of that unit each time it is sampled.

    ``items[u + units * k]`` must belong to unit ``u`` for every ``k``. ``models.training.PatchDataset`` does
    NOT guarantee this (it shuffles the subject order within each block of items), so build ``items`` with
    one patch source per subject, as ``client.private_round.PersonPatches`` does. The ``j``-th time unit ``u`` is
    read, it returns ``items[u + units * (j mod (len(items) // units))]``, so Poisson sampling over units
    gives subject-level DP while every draw sees a different patch. Use with ``num_workers=0`` (the draw
    counters live in this process).
    """

    def __init__(self, items: Dataset, units: int) -> None:
        units = int(units)
        if units < 1 or len(items) < units:
            raise PrivacyError(
                f"{len(items)} items cannot hold {units} privacy units (need at least one each)"
            )
        self.items = items
        self.units = units
        self.draws_per_unit = len(items) // units
        self._draws = [0] * units

    def __len__(self) -> int:
        return self.units

    def __getitem__(self, unit: int) -> Any:
        if not 0 <= unit < self.units:
            raise IndexError(unit)
        draw = self._draws[unit]
        self._draws[unit] += 1
        return self.items[unit + self.units * (draw % self.draws_per_unit)]


class PerSampleLoss(nn.Module):
    """A batch-mean loss as Opacus' fast gradient clipping needs it: ``reduction="none"`` gives ``(B,)``.

    Evaluates ``loss_fn`` on each sample (``(1, ...)`` slices of the inputs) and averages for ``"mean"``,
    which equals ``loss_fn`` on the batch for losses that are a mean of per-sample losses.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.reduction = "mean"

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = torch.stack(
            [self.loss_fn(output[i : i + 1], target[i : i + 1]) for i in range(output.shape[0])]
        )
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


def dp_step(model: nn.Module, batch: Any, loss_fn: Callable, optimizer: torch.optim.Optimizer) -> float:
    """One DP-SGD step on ``(inputs (B, ...), targets (B, ...))``; returns the batch loss, NaN if empty.

    An empty batch (Poisson sampling can draw one) still takes a step of noise only, which the accountant
    counts.
    """
    inputs, targets = batch
    optimizer.zero_grad(set_to_none=True)
    if len(inputs) == 0:
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            p.grad = torch.zeros_like(p)  # fast gradient clipping adds noise to p.grad
        optimizer.step()
        return math.nan
    device = next(model.parameters()).device
    loss = loss_fn(model(inputs.to(device)), targets.to(device))
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@dataclass
class PrivateTraining:
    """The private counterparts of a site's training objects for one round (or more) of DP-SGD.

    Attributes:
        model: wraps the caller's model and shares its parameters, so training updates the caller's model.
        optimizer: Opacus DP optimizer over the caller's optimizer (whose state, e.g. Adam moments, it uses).
        loss_fn: the loss to call on ``model``'s output (the caller's, or its fast-gradient-clipping wrapper).
        data_loader: Poisson-sampling loader over the dataset: each item is in a batch with ``sample_rate``.
        accountant: Opacus RDP accountant, counting every optimizer step (continued from a saved state).
        noise_multiplier: Gaussian noise std / ``config.max_grad_norm``.
        sample_rate: ``batch_size / len(dataset)``.
        config: the DP settings.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    data_loader: torch.utils.data.DataLoader
    accountant: Any
    noise_multiplier: float
    sample_rate: float
    config: DPConfig

    def run_steps(
        self,
        steps: int,
        step_fn: StepFunction = dp_step,
        *,
        step_hook: Callable[[int, float], None] | None = None,
    ) -> list[float]:
        """Take exactly ``steps`` DP-SGD steps, each on a fresh Poisson batch; returns each step's loss.

        Args:
            steps: optimizer steps (the round's local steps).
            step_fn: ``step_fn(model, batch, loss_fn, optimizer) -> loss``; e.g.
                ``functools.partial(models.training.training_step, proximal_to=..., proximal_mu=...)``.
            step_hook: called as ``step_hook(step_index, loss)`` after each step.
        """
        if steps < 0:
            raise ValueError(f"steps={steps} must be >= 0")
        self.model.train()
        losses: list[float] = []
        while len(losses) < steps:
            for batch in self.data_loader:
                losses.append(step_fn(self.model, batch, self.loss_fn, self.optimizer))
                if step_hook is not None:
                    step_hook(len(losses) - 1, losses[-1])
                if len(losses) == steps:
                    break
        return losses

    @property
    def steps_taken(self) -> int:
        """All steps the accountant has counted, earlier rounds of the run included."""
        return sum(int(steps) for _, _, steps in self.accountant.history)

    def spent_epsilon(self, delta: float | None = None) -> float:
        """ε spent by the run so far (all steps the accountant counted) at ``delta`` (default ``config.delta``)."""
        return history_epsilon(self.accountant.history, self.config.delta if delta is None else delta)

    def accountant_state(self) -> dict:
        """The accountant's state as JSON types; pass it as ``accountant_state`` to continue the run."""
        return accountant_state(self.accountant)

    def close(self) -> nn.Module:
        """Remove Opacus' hooks and per-sample attributes; returns the caller's (plain) model."""
        return self.model.to_standard_module()

    def __enter__(self) -> PrivateTraining:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_private_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    batch_size: int,
    config: DPConfig,
    *,
    loss_fn: Callable[..., torch.Tensor],
    planned_steps: int | None = None,
    accountant_state: Mapping | None = None,
    generator: torch.Generator | None = None,
) -> PrivateTraining:
    """Wrap a model, its optimizer and its data for DP-SGD with Opacus (as ``PrivacyEngine.make_private``).

    Use it as a context manager (or call ``close()``) so the model is plain again after the round; the
    caller's optimizer keeps its state across rounds.

    Args:
        model: the network in train mode; no BatchNorm (batch statistics mix samples).
        optimizer: optimizer over ``model``'s trainable parameters (or a DP optimizer of an earlier round).
        dataset: one item per privacy unit (see ``PrivacyUnitDataset``), each ``(input, target)``.
        batch_size: expected batch size; the sampling rate is ``batch_size / len(dataset)``.
        config: DP settings (must be enabled).
        loss_fn: the training loss, a mean over the batch of per-sample losses.
        planned_steps: the run's total steps (rounds x local steps), needed with ``config.target_epsilon``.
        accountant_state: the run's accountant state so far (``PrivateTraining.accountant_state()`` or
            ``PrivacyLedger.accountant_state(run_id)``), so ε stays cumulative for the run.
        generator: random source of batch sampling and noise (reproducible runs); not with secure_mode.
    """
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    from opacus.validators import ModuleValidator
    from opacus.validators.errors import UnsupportedModuleError

    if not config.enabled:
        raise PrivacyError("make_private_training was called with DP disabled (DPConfig.enabled=False)")
    if not config.poisson_sampling:
        raise PrivacyError(
            "poisson_sampling=False is not supported: the accountant's ε holds only for Poisson sampling"
        )
    n_units = len(dataset)
    if not 1 <= batch_size <= n_units:
        raise PrivacyError(
            f"batch_size={batch_size} must be between 1 and the number of privacy units ({n_units}); "
            "with fewer subjects than the batch size, lower the batch size"
        )
    sample_rate = batch_size / n_units
    check_privacy_parameters(sample_rate=sample_rate, delta=config.delta)
    noise_multiplier = config.resolve_noise_multiplier(sample_rate, planned_steps)
    try:
        ModuleValidator.validate(model, strict=True)
    except UnsupportedModuleError as exc:
        raise PrivacyError(f"the network cannot be trained with DP-SGD: {exc}") from exc
    if config.secure_mode:
        if generator is not None:
            raise PrivacyError("secure_mode draws from the system's secure generator: pass no generator")
        try:
            generator = PrivacyEngine(accountant="rdp", secure_mode=True).secure_rng
        except ImportError as exc:
            raise PrivacyError(f"secure_mode needs the torchcsprng package: {exc}") from exc

    if isinstance(optimizer, DPOptimizer):
        optimizer = optimizer.original_optimizer
    parameters = {id(p) for p in model.parameters()}
    if any(id(p) not in parameters for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("the optimizer holds parameters that are not the model's")

    try:
        private_model = _wrap_model(model, config)
    except NotImplementedError as exc:
        raise PrivacyError(f"the network cannot be trained with DP-SGD: {exc}") from exc
    optimizer_class = DPOptimizerFastGradientClipping if config.grad_sample_mode == "ghost" else DPOptimizer
    private_optimizer = optimizer_class(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=batch_size,
        loss_reduction="mean",
        generator=generator,
        secure_mode=config.secure_mode,
    )
    accountant = make_accountant(accountant_state)
    private_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    data_loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=generator)
    private_loss = loss_fn
    if config.grad_sample_mode == "ghost":
        private_loss = DPLossFastGradientClipping(
            private_model, private_optimizer, PerSampleLoss(loss_fn), "mean"
        )
    return PrivateTraining(
        model=private_model,
        optimizer=private_optimizer,
        loss_fn=private_loss,
        data_loader=data_loader,
        accountant=accountant,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        config=config,
    )


def _wrap_model(model: nn.Module, config: DPConfig) -> nn.Module:
    """The per-sample-gradient wrapper of ``config.grad_sample_mode`` around ``model`` (shared parameters)."""
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping

    mode = config.grad_sample_mode
    if mode == "vmap":
        from privacy.vmap_grad_sample import VmapGradSampleModule

        wrapped = VmapGradSampleModule(model, loss_reduction="mean")
    elif mode == "ghost":
        # Conv3d has no ghost norm: its per-sample norms come from torch.func, not from the unfolded input.
        wrapped = GradSampleModuleFastGradientClipping(
            model, loss_reduction="mean", max_grad_norm=config.max_grad_norm, force_functorch=True
        )
    else:
        wrapped = GradSampleModule(model, loss_reduction="mean", force_functorch=mode == "functorch")
    # As make_private with Poisson sampling: a second backward pass before a step is an error.
    wrapped.forbid_grad_accumulation()
    return wrapped
