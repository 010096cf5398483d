"""The site's privacy ledger: budget refusal, crash safety without under-counting, resumed runs, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.cli import main as site_main
from privacy.accounting import epsilon_for, make_accountant
from privacy.errors import PrivacyBudgetExceeded, PrivacyError
from privacy.privacy_ledger import PrivacyLedger

RATE, NOISE, DELTA, STEPS = 0.1, 1.0, 1e-5, 50
ROUND = {"steps": STEPS, "sample_rate": RATE, "noise_multiplier": NOISE, "delta": DELTA}


def epsilon_after(rounds: int) -> float:
    return epsilon_for(rounds * STEPS, RATE, NOISE, DELTA)


def train_rounds(ledger: PrivacyLedger, run_id: str, rounds: range) -> None:
    for server_round in rounds:
        with ledger.reserved_round(run_id, server_round, **ROUND):
            pass


@pytest.fixture
def ledger(tmp_path: Path) -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.json")
    ledger.set_budget(epsilon=100.0, delta=1e-5)
    return ledger


def test_round_beyond_the_budget_is_refused_with_its_reason(ledger: PrivacyLedger) -> None:
    ledger.set_budget(epsilon=(epsilon_after(2) + epsilon_after(3)) / 2, delta=DELTA)
    train_rounds(ledger, "run-a", range(1, 3))

    decision = ledger.check_round("run-a", STEPS, RATE, NOISE, DELTA)
    assert not decision.allowed
    assert decision.epsilon_after == pytest.approx(epsilon_after(3))
    assert "run-a" in decision.reason and "lifetime budget" in decision.reason
    assert f"{epsilon_after(2):.3f}" in decision.reason and "--set-budget" in decision.reason
    with pytest.raises(PrivacyBudgetExceeded) as refused:
        ledger.reserve("run-a", 3, **ROUND)
    assert refused.value.reason == decision.reason
    assert len(ledger.releases()) == 2

    # Fewer steps still fit.
    assert ledger.check_round("run-a", 5, RATE, NOISE, DELTA).allowed


def test_without_a_budget_nothing_is_trained(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    decision = ledger.check_round("run-a", STEPS, RATE, NOISE, DELTA)
    assert not decision.allowed and "no lifetime privacy budget" in decision.reason
    assert str(ledger.path) in decision.reason


def test_epsilon_and_delta_of_different_runs_add_up(ledger: PrivacyLedger) -> None:
    train_rounds(ledger, "run-a", range(1, 3))
    decision = ledger.check_round("run-b", STEPS, RATE, NOISE, 1e-6)
    # Basic composition across runs: the other run's ε plus this run's.
    run_b = epsilon_for(STEPS, RATE, NOISE, 1e-6)
    assert decision.lifetime_epsilon_after == pytest.approx(epsilon_after(2) + run_b)
    ledger.set_budget(epsilon=epsilon_after(2) + 0.5 * run_b, delta=1e-5)
    assert not ledger.check_round("run-b", STEPS, RATE, NOISE, 1e-6).allowed

    ledger.set_budget(epsilon=100.0, delta=1e-5)
    refused = ledger.check_round("run-b", STEPS, RATE, NOISE, DELTA)
    assert not refused.allowed and "δ add up" in refused.reason
    summary = ledger.summary()
    assert [run.run_id for run in summary.runs] == ["run-a"]
    assert summary.left_epsilon == pytest.approx(100.0 - epsilon_after(2))


def test_a_run_keeps_one_delta(ledger: PrivacyLedger) -> None:
    train_rounds(ledger, "run-a", range(1, 2))
    decision = ledger.check_round("run-a", STEPS, RATE, NOISE, 1e-6)
    assert not decision.allowed and "differs from the run's δ" in decision.reason


def test_crash_between_reservation_and_commit_still_counts(ledger: PrivacyLedger) -> None:
    train_rounds(ledger, "run-a", range(1, 2))
    with pytest.raises(RuntimeError), ledger.reserved_round("run-a", 2, **ROUND):
        raise RuntimeError("site daemon killed mid-round")

    reopened = PrivacyLedger(ledger.path)
    statuses = [(r.server_round, r.status) for r in reopened.releases("run-a")]
    assert statuses == [(1, "committed"), (2, "reserved")]
    assert reopened.run_epsilon("run-a") == pytest.approx(epsilon_after(2))
    # The retried round is another release: the crashed one is not forgotten.
    train_rounds(reopened, "run-a", range(2, 3))
    assert reopened.run_epsilon("run-a") == pytest.approx(epsilon_after(3))
    (run,) = reopened.summary().runs
    assert (run.rounds, run.uncommitted, run.steps) == (2, 1, 3 * STEPS)


@pytest.mark.parametrize("failing", ["os.replace", "os.fsync"])
def test_failed_write_leaves_a_complete_ledger_and_loses_no_spending(
    ledger: PrivacyLedger, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    release = ledger.reserve("run-a", 1, **ROUND)
    before = ledger.path.read_bytes()

    def disk_failure(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(failing, disk_failure)
    with pytest.raises(OSError, match="disk full"):
        ledger.commit(release)
    with pytest.raises(OSError, match="disk full"):
        ledger.reserve("run-a", 2, **ROUND)
    monkeypatch.undo()

    assert ledger.path.read_bytes() == before
    assert json.loads(before)["releases"][0]["status"] == "reserved"
    assert [p.name for p in ledger.path.parent.iterdir() if ".tmp" in p.name] == []
    assert ledger.run_epsilon("run-a") == pytest.approx(epsilon_after(1))
    committed = ledger.commit(release)
    assert committed.status == "committed" and ledger.run_epsilon("run-a") == pytest.approx(epsilon_after(1))


def test_resumed_run_continues_the_count(ledger: PrivacyLedger) -> None:
    train_rounds(ledger, "run-a", range(1, 3))

    # A restarted site process: the run's accountant continues from the ledger.
    resumed = PrivacyLedger(ledger.path)
    accountant = make_accountant(resumed.accountant_state("run-a"))
    assert accountant.get_epsilon(DELTA) == pytest.approx(epsilon_after(2))
    assert resumed.check_round("run-a", STEPS, RATE, NOISE, DELTA).epsilon_after == pytest.approx(
        epsilon_after(3)
    )
    release = resumed.reserve("run-a", 3, **ROUND)
    assert release.epsilon_run == pytest.approx(epsilon_after(3))
    resumed.commit(release)
    assert resumed.run_epsilon("run-a") == pytest.approx(epsilon_after(3))
    assert resumed.accountant_state("new-run") is None


def test_commit_records_the_steps_taken_and_never_more_than_reserved(ledger: PrivacyLedger) -> None:
    release = ledger.reserve("run-a", 1, **ROUND)
    with pytest.raises(PrivacyError, match="took 60 steps but reserved 50"):
        ledger.commit(release, steps=60)
    assert ledger.releases()[0].status == "reserved"
    committed = ledger.commit(release, steps=30)
    assert committed.steps == 30
    assert ledger.run_epsilon("run-a") == pytest.approx(epsilon_for(30, RATE, NOISE, DELTA))


def test_damaged_ledger_is_named_and_not_overwritten(ledger: PrivacyLedger) -> None:
    ledger.path.write_text('{"format": "neurofed-privacy-ledger", "version": 1, "budget": nul')
    with pytest.raises(PrivacyError, match="do not delete") as error:
        ledger.reserve("run-a", 1, **ROUND)
    assert str(ledger.path) in str(error.value)
    assert ledger.path.read_text().endswith("nul")


def test_budget_cli_sets_the_budget_and_shows_spending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ledger.json"
    assert site_main(["budget", "--ledger", str(path), "--set-budget", "20", "--delta", "1e-5"]) == 0
    ledger = PrivacyLedger(path)
    assert (ledger.budget().epsilon, ledger.budget().delta) == (20.0, 1e-5)
    train_rounds(ledger, "run-a", range(1, 3))
    ledger.reserve("run-a", 3, steps=10, sample_rate=RATE, noise_multiplier=NOISE, delta=DELTA)
    capsys.readouterr()

    assert site_main(["budget", "--ledger", str(path)]) == 0
    out = capsys.readouterr().out
    spent = ledger.run_epsilon("run-a")
    assert "run-a" in out and f"{spent:.3f}" in out
    assert f"left ε={20.0 - spent:.3f}" in out and "count as spent" in out


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--set-budget", "6"], "--set-budget needs --delta"),
        (["--delta", "1e-5"], "--delta is only used with --set-budget"),
        ([], "no privacy ledger at"),
        (["--set-budget", "-1", "--delta", "1e-5"], "epsilon=-1.0 must be a finite number > 0"),
    ],
)
def test_budget_cli_errors_say_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    path = tmp_path / "ledger.json"
    assert site_main(["budget", "--ledger", str(path), *options]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written
