"""One round of subject-level DP-SGD at a site, checked against and recorded in the site's ledger.

The privacy unit is the person (all sessions of ``sub-X``, `client.subjects.person_of`): each step
includes each training person with probability ``batch_size / len(persons)`` (one fresh patch of one of
their sessions). The accountant continues from the run's releases
in the ledger, so ε is cumulative for the run; the noise multiplier comes from ``dp-noise-multiplier`` or
from ``dp-target-epsilon`` for the planned rounds x local steps. A round the ledger does not allow is a
`Refusal`: nothing is trained or recorded.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from client.site_secret import SECRET_FILE, SiteSecret
from client.site_setup import SIMULATED_BUDGET, SiteSetup
from contract.site_task import SiteTask
from contract.wire import DELTA_KEY, EPSILON_KEY, NOISE_MULTIPLIER_KEY, SAMPLE_RATE_KEY
from models.errors import NeurofedError

if TYPE_CHECKING:
    from privacy.dp_sgd import DPConfig
    from privacy.privacy_ledger import Decision, PrivacyLedger


@dataclass(frozen=True)
class Refusal:
    """The site declines to train a round: the round would exceed its lifetime privacy budget, or the run
    asks for training without DP at a site that requires it."""

    reason: str
    epsilon: float
    delta: float


def site_rng(task: SiteTask, site_id: str) -> np.random.Generator:
    """The draws of a round trained without DP: from the run's seed, the round and the site, so a resumed
    round repeats the interrupted one and a run can be repeated exactly. (A DP round draws from the
    site's secret instead, client/site_secret.py.)"""
    return np.random.default_rng([task.run.seed, task.server_round, zlib.crc32(site_id.encode())])


def dp_config(task: SiteTask) -> DPConfig:
    """The site's DP-SGD settings for this run (the noise multiplier wins over the target ε)."""
    from privacy.dp_sgd import DPConfig

    run = task.run
    if run.dp_max_grad_norm <= 0:
        raise NeurofedError(
            "the coordinator sent dp-max-grad-norm 0 (its 'set from the starting model' value) instead of the "
            "norm it chose; update the coordinator's neurofed"
        )
    return DPConfig(
        enabled=True,
        noise_multiplier=run.dp_noise_multiplier or None,
        target_epsilon=run.dp_target_epsilon,
        max_grad_norm=run.dp_max_grad_norm,
        delta=run.dp_delta,
        grad_sample_mode=run.dp_grad_sample_mode,
    )


def planned_noise(
    task: SiteTask, dp: DPConfig, ledger: PrivacyLedger, sample_rate: float, planned_steps: int
) -> float | str:
    """This round's noise multiplier: the run's plan (``planned_steps`` at the target ε), or, when the
    run's earlier rounds used another noise or sample rate (it was resumed with another number of rounds),
    the noise that keeps the whole run within its target ε over its remaining steps. A str says why no
    noise can (the refusal's reason)."""
    from privacy.accounting import noise_multiplier_for_remaining

    noise = dp.resolve_noise_multiplier(sample_rate, planned_steps)
    history = [r.segment for r in ledger.releases(task.run_id)]
    if dp.noise_multiplier or all(s[:2] == (noise, sample_rate) for s in history):
        return noise
    remaining = planned_steps - sum(s[2] for s in history)
    target = task.run.dp_target_epsilon
    replanned = (
        noise_multiplier_for_remaining(target, dp.delta, history, sample_rate, remaining)
        if remaining > 0
        else None
    )
    if replanned is None:
        return (
            f"privacy budget: run {task.run_id!r} already spent ε={ledger.run_epsilon(task.run_id):.3f} of its "
            f"dp-target-epsilon={target:g} in {len(history)} round(s), so {task.run.num_rounds} rounds cannot "
            "keep within it; resume it with fewer rounds, or start a new run"
        )
    return replanned


def budget_advice(
    decision: Decision,
    setup: SiteSetup,
    ledger: PrivacyLedger,
    sample_rate: float,
    steps: int,
    task: SiteTask,
) -> str:
    """The ledger's refusal, and what would fit: the largest dp-target-epsilon of a new run of this shape,
    and where a deployed site's operator raises the lifetime budget."""
    if decision.lifetime_epsilon_after is None:  # no budget: the reason says how to set one
        return decision.reason
    fits = ledger.largest_new_run_epsilon(sample_rate, steps, task.run.dp_delta)
    run = task.run
    shape = (
        f"{run.num_rounds} round(s) x {run.local_steps} steps at this site's sample rate {sample_rate:.3g}"
    )
    advice = (
        f"a new run of {shape} fits this site's budget with dp-target-epsilon <= {fits:.3g}"
        if fits > 0.01
        else "this site's lifetime budget is spent: it can take part in no further DP run"
    )
    where = "" if setup.simulated else " (neurofed-site start --budget, NEUROFED_BUDGET_EPSILON in site.env)"
    return f"{decision.reason}{where}; {advice}"


def prepare_ledger(setup: SiteSetup) -> PrivacyLedger:
    """The site's ledger, checked to be its latest version, its lifetime budget set from the node config.

    A deployed site's ledger must have been set up by its operator (`neurofed-site budget --init`); it is
    never created here, so a lost ledger cannot silently start again from zero. A simulated site's ledger
    (in the run directory, fresh per run) is created with its folder. For either, a missing ledger whose
    marker exists, or a ledger older than its marker (rolled back), is a NeurofedError naming the files.
    A budget in the node config (``budget-epsilon``, ``budget-delta``) replaces the ledger's; a simulated
    site whose ledger has none gets `SIMULATED_BUDGET`. A deployed site without either is refused every
    DP round, with a reason that says how to set one.
    """
    from privacy.errors import PrivacyError

    ledger = setup.ledger
    try:
        if not ledger.verify():
            if not setup.simulated:
                from client.privacy_budget import init_command

                raise NeurofedError(
                    f"site {setup.site_id} has no privacy ledger at {ledger.path} (nor its marker), so it trains "
                    f"no DP round. A new site is set up once by its operator: `{init_command(ledger.path)}`. "
                    "If this site has trained before, its ledger was lost: restore the latest backup of the "
                    f"ledger, {ledger.marker_path.name} and {SECRET_FILE} instead, and never --init again"
                )
            ledger.path.parent.mkdir(parents=True, exist_ok=True)
        current = ledger.budget()
        wanted = setup.budget or (SIMULATED_BUDGET if setup.simulated and current is None else None)
        if wanted is not None and (current is None or (current.epsilon, current.delta) != wanted):
            ledger.set_budget(*wanted)
    except PrivacyError as exc:
        raise NeurofedError(f"site {setup.site_id}: {exc}") from exc
    return ledger


def site_refusal(task: SiteTask, setup: SiteSetup, reason: str) -> Refusal:
    """A refusal of the site's own rules (no DP where it requires DP, a setting beyond its caps), with the
    run's ε so far."""
    return Refusal(
        f"site {setup.site_id}: {reason}",
        setup.ledger.run_epsilon(task.run_id) if setup.ledger.path.is_file() else 0.0,
        task.run.dp_delta,
    )


def no_dp_refusal(task: SiteTask, setup: SiteSetup) -> Refusal:
    """The refusal of a site that trains only with DP, asked to train without it."""
    return site_refusal(
        task,
        setup,
        "the site trains only with differential privacy and this run has dp=false; "
        "run with dp=true, or the site operator starts the site with --allow-no-dp",
    )


class PersonPatches(torch.utils.data.Dataset):
    """Patches arranged as ``privacy.dp_sgd.PrivacyUnitDataset`` requires: item ``u + n * k`` is the
    ``k``-th draw of person ``u`` (of ``n``): ``multiplicity`` patches of that person stacked,
    ``(image (K, C, *patch) float32, label (K, 1, *patch) int64)``, or one patch ``(C, *patch)``, ``(1, *patch)``
    when ``multiplicity`` is 1.

    One `models.training.PatchDataset` per person over all of that person's sessions, so a unit never
    draws another person's patch and a person with many sessions is still one unit.
    """

    def __init__(
        self, persons: list[list], config: Any, patches_per_person: int, seed: int, multiplicity: int = 1
    ) -> None:
        from models.training import PatchDataset

        seeds = np.random.default_rng(seed).integers(0, 2**63 - 1, size=len(persons))
        self.multiplicity = int(multiplicity)
        self.per_subject = [
            PatchDataset.from_config(sessions, config, length=patches_per_person * self.multiplicity, seed=int(s))
            for sessions, s in zip(persons, seeds, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.per_subject) * (len(self.per_subject[0]) // self.multiplicity)

    def __getitem__(self, index: int) -> Any:
        draw, unit = divmod(index, len(self.per_subject))
        patches = self.per_subject[unit]
        if self.multiplicity == 1:
            return patches[draw]
        items = [patches[draw * self.multiplicity + k] for k in range(self.multiplicity)]
        return torch.stack([image for image, _ in items]), torch.stack([label for _, label in items])


def train_private_round(
    model: torch.nn.Module,
    persons: list[list],
    config: Any,
    task: SiteTask,
    setup: SiteSetup,
    proximal_to: Mapping[str, torch.Tensor] | None,
) -> tuple[Any, dict[str, float]] | Refusal:
    """Train one round with person-level DP-SGD (see the module docstring).

    Args:
        persons: the training subjects grouped by person (`client.site_data.SiteData.train_by_person`).

    Returns:
        ``(TrainResult, {"epsilon", "delta", "noise-multiplier", "sample-rate"})`` with the run's ε after
        this round, or a `Refusal` when the ledger does not allow the round (nothing is trained or recorded).
    """
    from models.training import TrainResult, make_loss, make_optimizer, training_step
    from models.weight_average import WeightAverage
    from privacy.dp_sgd import PrivacyUnitDataset, make_private_training
    from privacy.errors import PrivacyBudgetExceeded, PrivacyError

    if not task.run_id:
        raise NeurofedError("the server's message lacks 'run-id', which DP needs; update the coordinator")
    run, dp = task.run, dp_config(task)
    ledger = prepare_ledger(setup)
    n_persons = len(persons)
    # Poisson sampling over persons: a batch larger than the site's persons is not possible.
    batch_size = min(run.batch_size, n_persons)
    sample_rate = batch_size / n_persons
    planned_steps = run.num_rounds * run.local_steps
    try:
        noise = planned_noise(task, dp, ledger, sample_rate, planned_steps)
        if isinstance(noise, str):
            return Refusal(f"site {setup.site_id}: {noise}", ledger.run_epsilon(task.run_id), dp.delta)
        decision = ledger.check_round(task.run_id, run.local_steps, sample_rate, noise, dp.delta)
    except PrivacyError as exc:
        raise NeurofedError(f"site {setup.site_id}: {exc}") from exc
    if not decision.allowed:
        return Refusal(
            budget_advice(decision, setup, ledger, sample_rate, planned_steps, task),
            ledger.run_epsilon(task.run_id),
            dp.delta,
        )
    dp = dataclasses.replace(dp, noise_multiplier=noise)  # the planned (or re-planned) noise

    # Every draw of the release comes from the site's secret, never from a value the coordinator knows.
    secret = SiteSecret.load_or_create(setup.state_dir)
    patch_seed = secret.seed(task.run_id, task.server_round, "patches")
    patches = PersonPatches(
        persons, config, max(run.local_steps, 1), patch_seed, multiplicity=run.dp_augmentation_multiplicity
    )
    units = PrivacyUnitDataset(patches, n_persons)
    optimizer = make_optimizer(model, config)
    started = time.perf_counter()
    model.train()
    try:
        with (
            torch.random.fork_rng(devices=[]),
            make_private_training(
                model,
                optimizer,
                units,
                batch_size,
                dp,
                loss_fn=make_loss(),
                planned_steps=planned_steps,
                accountant_state=ledger.accountant_state(task.run_id),
                generator=secret.torch_generator(task.run_id, task.server_round, "sampling-and-noise"),
            ) as private,
        ):
            torch.manual_seed(secret.seed(task.run_id, task.server_round, "dropout"))
            with ledger.reserved_round(
                task.run_id,
                task.server_round,
                steps=run.local_steps,
                sample_rate=private.sample_rate,
                noise_multiplier=private.noise_multiplier,
                delta=dp.delta,
            ):
                average = WeightAverage(model, run.ema_decay) if run.ema_decay > 0 else None
                losses = private.run_steps(
                    run.local_steps,
                    step_fn=partial(training_step, proximal_to=proximal_to, proximal_mu=task.proximal_mu),
                    step_hook=(lambda _step, _loss: average.update()) if average is not None else None,
                )
                if average is not None:
                    average.copy_to_model()
    except PrivacyBudgetExceeded as exc:
        # Another run spent the budget between the check and the reservation.
        return Refusal(exc.reason, ledger.run_epsilon(task.run_id), dp.delta)
    except PrivacyError as exc:
        raise NeurofedError(f"site {setup.site_id}: {exc}") from exc
    result = TrainResult(
        steps=len(losses),
        n_samples_seen=len(losses) * batch_size,
        losses=losses,
        seconds=time.perf_counter() - started,
    )
    privacy = {
        EPSILON_KEY: ledger.run_epsilon(task.run_id),
        DELTA_KEY: dp.delta,
        NOISE_MULTIPLIER_KEY: private.noise_multiplier,
        SAMPLE_RATE_KEY: private.sample_rate,
    }
    return result, privacy
