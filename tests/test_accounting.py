"""The site's ε agrees with Google's independent RDP accountant (dp-accounting), and stays cumulative;
the ledger's lifetime ε, every run composed at the lifetime δ, agrees with it too."""

from __future__ import annotations

import json
import logging
import math

import pytest

from privacy.accounting import (
    RDP_ORDERS,
    accountant_state,
    epsilon_for,
    history_epsilon,
    make_accountant,
    noise_multiplier_for_target,
)
from privacy.errors import PrivacyError
from privacy.privacy_ledger import PrivacyLedger

dp_accounting = pytest.importorskip("dp_accounting")


@pytest.fixture(autouse=True)
def _quiet_dp_accounting(caplog: pytest.LogCaptureFixture) -> None:
    # dp-accounting logs every fractional Rényi order it cannot evaluate; not a failure.
    caplog.set_level(logging.ERROR)


def google_epsilon(rounds: list[tuple[float, float, int]], delta: float) -> float:
    """ε of ``(noise_multiplier, sample_rate, steps)`` rounds composed, by dp-accounting's RDP accountant."""
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    for noise, rate, steps in rounds:
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    ("steps", "sample_rate", "noise_multiplier", "delta"),
    [
        (100, 0.01, 1.0, 1e-5),
        (1000, 0.05, 1.1, 1e-5),
        (25, 0.5, 2.0, 1e-5),
        (300, 0.2, 2.0, 1e-6),
        (2000, 0.01, 0.7, 1e-5),
        (50, 0.33, 3.0, 1e-5),
        (10, 1.0, 5.0, 1e-5),
    ],
)
def test_epsilon_agrees_with_dp_accounting(
    steps: int, sample_rate: float, noise_multiplier: float, delta: float
) -> None:
    # Useful regimes (ε up to ~20): for larger ε the best Rényi orders are fractional ones near 1 that
    # dp-accounting gives up on (it logs and skips them), and the accountants part by a few percent.
    ours = epsilon_for(steps, sample_rate, noise_multiplier, delta)
    reference = google_epsilon([(noise_multiplier, sample_rate, steps)], delta)
    assert ours == pytest.approx(reference, rel=0.01)


def test_epsilon_is_cumulative_across_rounds_and_agrees_with_dp_accounting() -> None:
    # Rounds with changing local steps, noise and sample rate; the accountant's state goes through JSON
    # between rounds, as it does through the ledger and run files.
    rounds = [(1.0, 0.1, 20), (1.0, 0.1, 35), (1.3, 0.1, 10), (1.3, 0.25, 5), (0.9, 0.05, 60)]
    delta = 1e-5
    state = None
    epsilons = []
    for noise, rate, steps in rounds:
        accountant = make_accountant(state)
        for _ in range(steps):
            accountant.step(noise_multiplier=noise, sample_rate=rate)
        state = json.loads(json.dumps(accountant_state(accountant)))
        epsilons.append(history_epsilon(state["history"], delta))
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == len(epsilons)
    assert epsilons[-1] == pytest.approx(google_epsilon(rounds, delta), rel=0.01)
    assert epsilons[-1] == pytest.approx(make_accountant(state).get_epsilon(delta), rel=1e-12)
    # Per-round ε would understate the run: the last round alone spends much less.
    assert epsilon_for(rounds[-1][2], rounds[-1][1], rounds[-1][0], delta) < 0.7 * epsilons[-1]


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_noise_multiplier_for_target_meets_the_target_closely(target: float) -> None:
    sample_rate, steps, delta = 0.02, 500, 1e-5
    noise = noise_multiplier_for_target(target, delta, sample_rate, steps)
    spent = epsilon_for(steps, sample_rate, noise, delta)
    assert target * 0.99 <= spent <= target
    assert google_epsilon([(noise, sample_rate, steps)], delta) <= target * 1.01


def test_more_steps_need_more_noise_for_the_same_target() -> None:
    fewer = noise_multiplier_for_target(3.0, 1e-5, 0.05, 100)
    more = noise_multiplier_for_target(3.0, 1e-5, 0.05, 1000)
    assert more > fewer


def test_zero_noise_gives_infinite_epsilon_and_empty_history_zero() -> None:
    assert math.isinf(epsilon_for(10, 0.1, 0.0, 1e-5))
    assert history_epsilon([], 1e-5) == 0.0


def test_bad_parameters_are_named() -> None:
    with pytest.raises(PrivacyError, match=r"delta=0\.0 must be in \(0, 1\)"):
        epsilon_for(10, 0.1, 1.0, 0.0)
    with pytest.raises(PrivacyError, match=r"sample_rate=1\.5"):
        noise_multiplier_for_target(3.0, 1e-5, 1.5, 100)
    with pytest.raises(PrivacyError, match="planned number of steps"):
        noise_multiplier_for_target(3.0, 1e-5, 0.1, 0)


def test_restoring_a_foreign_accountant_state_is_a_clear_error() -> None:
    with pytest.raises(PrivacyError, match="cannot restore the privacy accountant"):
        make_accountant({"mechanism": "prv", "history": []})


def test_ledger_lifetime_epsilon_composes_all_runs_as_dp_accounting_does(tmp_path) -> None:
    # Three runs with their own δ, sample rates and noise, one with an uncommitted (crashed) round: the
    # lifetime ε is all releases composed in one RDP accountant, converted once at the lifetime δ.
    runs = {
        "run-a": (1e-5, [(1.1, 0.05, 40), (1.1, 0.05, 40), (1.1, 0.05, 25)]),
        "run-b": (1e-6, [(1.5, 0.2, 30), (1.5, 0.2, 30)]),
        "run-c": (1e-5, [(0.9, 0.01, 200), (2.0, 0.5, 5)]),
    }
    lifetime_delta = 1e-5
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.jsonl")
    ledger.set_budget(epsilon=50.0, delta=lifetime_delta)
    for run_id, (delta, rounds) in runs.items():
        for server_round, (noise, rate, steps) in enumerate(rounds, start=1):
            release = ledger.reserve(
                run_id, server_round, steps=steps, sample_rate=rate, noise_multiplier=noise, delta=delta
            )
            if run_id != "run-c" or server_round == 1:
                ledger.commit(release)
    every_round = [segment for _, rounds in runs.values() for segment in rounds]
    reference = google_epsilon(every_round, lifetime_delta)
    assert ledger.lifetime_epsilon() == pytest.approx(reference, rel=0.01)
    summary = ledger.summary()
    assert summary.left_epsilon == pytest.approx(50.0 - reference, rel=0.01)
    # Each run's own ε, at its δ, is dp-accounting's for that run alone; the lifetime figure is not their sum.
    for run in summary.runs:
        delta, rounds = runs[run.run_id]
        assert run.epsilon == pytest.approx(google_epsilon(rounds, delta), rel=0.01)
    assert ledger.lifetime_epsilon() < sum(run.epsilon for run in summary.runs)
