"""Privacy accounting for DP-SGD: Opacus' RDP accountant, its persistent state, and noise for a target ε.

A run's privacy loss is a history of segments ``(noise_multiplier, sample_rate, steps)``: the
Poisson-subsampled Gaussian mechanism applied ``steps`` times with that noise multiplier (noise std /
clipping norm) and sampling probability. Rényi DP adds up over segments and is converted to (ε, δ)-DP once,
at the end (Opacus ``RDPAccountant``, orders 1.1-63). The history is the accountant's state
(``accountant.state_dict()``); it persists across rounds and restarts, so ε is always cumulative for a run,
never per round.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from privacy.errors import PrivacyError

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant

# Opacus (and with it torch) is imported where it is used: `neurofed-site budget` and the ledger's
# bookkeeping answer in a fraction of a second.

Segment = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)``: ``steps`` DP-SGD steps with the same noise and sampling."""


@lru_cache(maxsize=1)
def _rdp_orders() -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant

    return tuple(RDPAccountant.DEFAULT_ALPHAS)


def __getattr__(name: str) -> Any:
    if name == "RDP_ORDERS":
        # Rényi orders over which the conversion to (ε, δ) is optimised (Opacus' defaults).
        return _rdp_orders()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_privacy_parameters(
    *,
    sample_rate: float | None = None,
    noise_multiplier: float | None = None,
    delta: float | None = None,
    steps: int | None = None,
    epsilon: float | None = None,
) -> None:
    """Raise PrivacyError naming every given parameter that is out of range (``None`` ones are skipped)."""
    problems = []
    if sample_rate is not None and not 0.0 < sample_rate <= 1.0:
        problems.append(f"sample_rate={sample_rate} must be in (0, 1]")
    if noise_multiplier is not None and not noise_multiplier >= 0.0:
        problems.append(f"noise_multiplier={noise_multiplier} must be >= 0")
    if delta is not None and not 0.0 < delta < 1.0:
        problems.append(f"delta={delta} must be in (0, 1), e.g. 1e-5")
    if steps is not None and (int(steps) != steps or steps < 0):
        problems.append(f"steps={steps} must be a whole number >= 0")
    if epsilon is not None and not (epsilon > 0.0 and math.isfinite(epsilon)):
        problems.append(f"epsilon={epsilon} must be a finite number > 0")
    if problems:
        raise PrivacyError("invalid privacy parameters: " + "; ".join(problems))


def make_accountant(state: Mapping | None = None) -> RDPAccountant:
    """An RDP accountant, continuing from ``state`` (from ``accountant_state``) when given."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    if state is not None:
        try:
            accountant.load_state_dict(dict(state))
        except ValueError as exc:
            raise PrivacyError(f"cannot restore the privacy accountant: {exc}") from exc
        accountant.history = [_segment(s) for s in accountant.history]
    return accountant


def accountant_state(accountant: RDPAccountant) -> dict:
    """The accountant's state as plain JSON types: ``{"mechanism": "rdp", "history": [[σ, q, steps], ...]}``."""
    state = accountant.state_dict()
    return {"mechanism": state["mechanism"], "history": [list(_segment(s)) for s in state["history"]]}


def history_epsilon(history: Iterable[Sequence], delta: float) -> float:
    """ε at ``delta`` of all ``(noise_multiplier, sample_rate, steps)`` segments of ``history`` composed.

    The same as ``RDPAccountant.get_epsilon`` with this history. Zero for an empty history; infinite if a
    segment has noise multiplier 0 (no privacy).
    """
    check_privacy_parameters(delta=delta)
    segments = [_segment(s) for s in history if int(s[2]) > 0]
    if not segments:
        return 0.0
    if any(noise == 0.0 for noise, _, _ in segments):
        return math.inf
    from opacus.accountants.analysis import rdp as rdp_analysis

    # Rényi DP of a segment is its steps times that of one step.
    rdp = sum(steps * _rdp_of_one_step(noise, rate) for noise, rate, steps in segments)
    epsilon, _ = rdp_analysis.get_privacy_spent(orders=list(_rdp_orders()), rdp=rdp, delta=delta)
    return float(epsilon)


def epsilon_for(
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    delta: float,
    *,
    history: Iterable[Sequence] = (),
) -> float:
    """ε at ``delta`` after ``steps`` DP-SGD steps (on top of the segments in ``history``, if any).

    Args:
        steps: optimizer steps, each on a Poisson sample of the data.
        sample_rate: probability that a privacy unit (a subject) is in a step's batch, in (0, 1].
        noise_multiplier: Gaussian noise std divided by the per-sample clipping norm.
        delta: the δ of (ε, δ)-DP.
        history: earlier ``(noise_multiplier, sample_rate, steps)`` segments of the same run.
    """
    check_privacy_parameters(
        steps=steps, sample_rate=sample_rate, noise_multiplier=noise_multiplier, delta=delta
    )
    return history_epsilon([*history, (noise_multiplier, sample_rate, steps)], delta)


@lru_cache(maxsize=256)
def noise_multiplier_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to 0.1 % of ε) whose ε after ``steps`` steps is at most ``target_epsilon``.

    Opacus' ``get_noise_multiplier`` with the RDP accountant. ``steps`` is the whole run (rounds x local
    steps), so the target holds for the run, not per round.
    """
    check_privacy_parameters(epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps)
    if steps < 1:
        raise PrivacyError(f"steps={steps}: a target ε needs the planned number of steps (>= 1)")
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            # The search visits noise levels far from the answer, whose best Rényi order is an extreme one.
            warnings.filterwarnings("ignore", message="Optimal order is the")
            noise = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=int(steps),
                accountant="rdp",
                epsilon_tolerance=1e-3 * target_epsilon,
            )
        return float(noise)
    except ValueError as exc:
        raise PrivacyError(
            f"target ε={target_epsilon} at δ={delta} cannot be met with {steps} steps at sample rate "
            f"{sample_rate:.4g} ({exc}); raise the target, or plan fewer steps or a smaller batch"
        ) from exc


def noise_multiplier_for_remaining(
    target_epsilon: float, delta: float, history: Sequence[Sequence], sample_rate: float, steps: int
) -> float | None:
    """The smallest noise multiplier (to 0.1 % of ε) with which ``steps`` more steps, on top of the run's
    ``history``, keep the run's ε at ``delta`` at most ``target_epsilon``; None when the history alone
    already spends the target, or all but 1 % of it (no useful noise keeps the run within it).

    A run whose plan changed after some rounds (resumed with another number of rounds) re-plans its noise
    with it; for an empty history it is `noise_multiplier_for_target`.
    """
    check_privacy_parameters(epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps)
    if not history:
        return noise_multiplier_for_target(target_epsilon, delta, sample_rate, steps)
    if history_epsilon(history, delta) >= 0.99 * target_epsilon:
        return None

    return smallest_noise_multiplier(
        lambda noise: history_epsilon([*history, (noise, sample_rate, steps)], delta) <= target_epsilon
    )


def smallest_noise_multiplier(fits: Callable[[float], bool], tolerance: float = 1e-3) -> float | None:
    """The smallest noise multiplier (to ``tolerance``, relative) for which ``fits`` holds (``fits`` grows
    with the noise); None when not even a noise multiplier of a million fits. Each try is an RDP
    computation at fractional orders (tenths of a second): bisection keeps them few."""
    low, high = 0.0, 1.0
    while not fits(high):
        low, high = high, high * 2
        if high > 1e6:
            return None
    while high - low > tolerance * high:
        middle = (low + high) / 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


@lru_cache(maxsize=1024)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Rényi DP at each of ``RDP_ORDERS`` of one Poisson-subsampled Gaussian step (fractional orders are slow)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(_rdp_orders())
    )
    rdp.setflags(write=False)
    return rdp


def _segment(segment: Sequence) -> Segment:
    noise, rate, steps = segment
    return (float(noise), float(rate), int(steps))
