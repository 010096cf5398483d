"""The site's privacy ledger: budget refusal, RDP composition of all runs at one lifetime δ, crash safety
without under-counting, resumed runs, loss and rollback refused, the CLI."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from client.cli import main as site_main
from client.privacy_budget import init_site
from client.private_round import prepare_ledger
from client.site_secret import SECRET_FILE
from client.site_setup import SIMULATED_BUDGET, SiteSetup
from models.errors import NeurofedError
from privacy.accounting import (
    epsilon_for,
    history_epsilon,
    make_accountant,
    noise_multiplier_for_target,
)
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
    assert f"{epsilon_after(2):.3f}" in decision.reason and "dp-target-epsilon" in decision.reason
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


def test_runs_compose_by_rdp_at_the_lifetime_delta(ledger: PrivacyLedger) -> None:
    train_rounds(ledger, "run-a", range(1, 3))
    decision = ledger.check_round("run-b", STEPS, RATE, NOISE, 1e-6)
    # One RDP accountant over every release of every run, converted once at the lifetime δ=1e-5: tighter
    # than adding the runs' ε (basic composition), and the runs' δ are not summed.
    composed = history_epsilon([(NOISE, RATE, 3 * STEPS)], 1e-5)
    run_b = epsilon_for(STEPS, RATE, NOISE, 1e-6)
    assert decision.allowed
    assert decision.lifetime_epsilon_after == pytest.approx(composed)
    assert decision.lifetime_epsilon_after < epsilon_after(2) + run_b
    assert decision.epsilon_after == pytest.approx(run_b)  # the run's own ε, at the run's δ
    assert "lifetime ε" in decision.reason and "all runs composed" in decision.reason

    ledger.set_budget(epsilon=(epsilon_after(2) + composed) / 2, delta=1e-5)
    refused = ledger.check_round("run-b", STEPS, RATE, NOISE, 1e-6)
    assert not refused.allowed and "lifetime budget" in refused.reason
    summary = ledger.summary()
    assert [run.run_id for run in summary.runs] == ["run-a"]
    assert summary.spent_epsilon == pytest.approx(epsilon_after(2))
    assert summary.left_epsilon == pytest.approx((composed - epsilon_after(2)) / 2)


def test_many_runs_share_one_lifetime_delta(ledger: PrivacyLedger) -> None:
    # Five runs at δ=1e-5 each under a lifetime δ of 1e-5: summing δ (basic composition) would have
    # refused the second run; composed by RDP every one fits, and the lifetime ε stays below the runs' sum.
    ledger.set_budget(epsilon=20.0, delta=1e-5)
    for run in range(5):
        assert ledger.check_round(f"run-{run}", STEPS, RATE, NOISE, DELTA).allowed
        train_rounds(ledger, f"run-{run}", range(1, 3))
    summary = ledger.summary()
    assert len(summary.runs) == 5 and sum(run.delta for run in summary.runs) == pytest.approx(5e-5)
    assert summary.spent_epsilon == pytest.approx(epsilon_after(10))
    assert summary.spent_epsilon < sum(run.epsilon for run in summary.runs) / 2
    assert summary.left_epsilon == pytest.approx(20.0 - epsilon_after(10))


def test_a_refusal_can_say_which_new_run_still_fits(ledger: PrivacyLedger) -> None:
    ledger.set_budget(epsilon=(epsilon_after(4) + epsilon_after(5)) / 2, delta=DELTA)
    train_rounds(ledger, "run-a", range(1, 4))
    fits = ledger.largest_new_run_epsilon(RATE, 2 * STEPS, DELTA)
    assert 0 < fits < ledger.budget().epsilon
    # A new run planned at that ε (its noise for 2 rounds) fits; with a little less noise it would not.
    noise = noise_multiplier_for_target(fits, DELTA, RATE, 2 * STEPS)
    assert ledger.check_round("run-b", 2 * STEPS, RATE, noise, DELTA).allowed
    assert not ledger.check_round("run-b", 2 * STEPS, RATE, noise * 0.97, DELTA).allowed
    ledger.set_budget(epsilon=epsilon_after(3), delta=DELTA)
    assert ledger.largest_new_run_epsilon(RATE, STEPS, DELTA) == 0.0


def test_a_site_replans_the_noise_of_a_run_resumed_with_more_rounds(ledger: PrivacyLedger) -> None:
    from client.private_round import dp_config, planned_noise
    from contract.run_config import RunConfig
    from contract.site_task import SiteTask

    def task(rounds: int) -> SiteTask:
        run = RunConfig(
            num_rounds=rounds, local_steps=STEPS, dp_target_epsilon=8.0, dp_delta=DELTA, dp_max_grad_norm=1.0
        )
        return SiteTask(run=run, server_round=3, run_id="run-a")

    planned = noise_multiplier_for_target(8.0, DELTA, RATE, 5 * STEPS)
    for server_round in (1, 2):
        with ledger.reserved_round("run-a", server_round, **{**ROUND, "noise_multiplier": planned}):
            pass
    assert planned_noise(task(5), dp_config(task(5)), ledger, RATE, 5 * STEPS) == planned  # as planned
    replanned = planned_noise(task(8), dp_config(task(8)), ledger, RATE, 8 * STEPS)  # resumed for 8 rounds
    assert replanned > planned
    assert history_epsilon([(planned, RATE, 2 * STEPS), (replanned, RATE, 6 * STEPS)], DELTA) <= 8.0
    # Two rounds planned as the whole run spent its target: a resume for more is refused, saying why.
    spent = noise_multiplier_for_target(8.0, DELTA, RATE, 2 * STEPS)
    for server_round in (1, 2):
        with ledger.reserved_round("run-b", server_round, **{**ROUND, "noise_multiplier": spent}):
            pass
    longer = SiteTask(run=task(4).run, server_round=3, run_id="run-b")
    reason = planned_noise(longer, dp_config(longer), ledger, RATE, 4 * STEPS)
    assert isinstance(reason, str) and "dp-target-epsilon=8" in reason and "fewer rounds" in reason


def test_lifetime_check_refuses_once_the_composed_epsilon_passes_the_budget(ledger: PrivacyLedger) -> None:
    ledger.set_budget(epsilon=(epsilon_after(4) + epsilon_after(5)) / 2, delta=DELTA)
    for run in ("run-a", "run-b"):
        train_rounds(ledger, run, range(1, 3))
    # Each new run alone would spend little; the lifetime ε of all five rounds composed is too much.
    refused = ledger.check_round("run-c", STEPS, RATE, NOISE, DELTA)
    assert not refused.allowed
    assert refused.lifetime_epsilon_after == pytest.approx(epsilon_after(5))
    assert refused.epsilon_after == pytest.approx(epsilon_after(1))
    assert refused.epsilon_after < ledger.budget().epsilon
    assert f"from {epsilon_after(4):.3f} to {epsilon_after(5):.3f}" in refused.reason
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.reserve("run-c", 1, **ROUND)
    # An uncommitted reservation counts as spent in the lifetime figure too.
    ledger.set_budget(epsilon=(epsilon_after(5) + epsilon_after(6)) / 2, delta=DELTA)
    ledger.reserve("run-c", 1, **ROUND)
    assert not ledger.check_round("run-d", STEPS, RATE, NOISE, DELTA).allowed
    assert ledger.lifetime_epsilon() == pytest.approx(epsilon_after(5))


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
    assert (
        site_main(["budget", "--init", "--ledger", str(path), "--set-budget", "30", "--delta", "1e-5"]) == 0
    )
    assert site_main(["budget", "--ledger", str(path), "--set-budget", "20", "--delta", "1e-5"]) == 0
    ledger = PrivacyLedger(path)
    assert (ledger.budget().epsilon, ledger.budget().delta) == (20.0, 1e-5)
    train_rounds(ledger, "run-a", range(1, 3))
    ledger.reserve("run-a", 3, steps=10, sample_rate=RATE, noise_multiplier=NOISE, delta=DELTA)
    train_rounds(ledger, "run-b", range(1, 2))
    capsys.readouterr()

    assert site_main(["budget", "--ledger", str(path)]) == 0
    out = capsys.readouterr().out
    run_a, lifetime = ledger.run_epsilon("run-a"), ledger.lifetime_epsilon()
    assert "run-a" in out and f"{run_a:.3f}" in out and "count as spent" in out
    assert f"lifetime ε={lifetime:.3f} at the lifetime δ=1e-05" in out and "composed" in out
    assert f"left ε={20.0 - lifetime:.3f}" in out
    assert lifetime < run_a + ledger.run_epsilon("run-b")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--set-budget", "6"], "--set-budget needs --delta"),
        (["--delta", "1e-5"], "--delta is only used with --set-budget"),
        ([], "no privacy ledger at"),
        (["--set-budget", "6", "--delta", "1e-5"], "neurofed-site budget --init --ledger"),
        (["--set-budget", "-1", "--delta", "1e-5"], "epsilon=-1.0 must be a finite number > 0"),
        (["--init"], "--init needs the lifetime budget"),
        (["--init", "--set-budget", "6", "--delta", "2"], "delta=2.0 must be in (0, 1)"),
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


# --- loss and rollback: the marker beside the ledger ---------------------------------------------------


def test_deleted_ledger_is_refused_naming_the_file_and_never_recreated(ledger: PrivacyLedger) -> None:
    train_rounds(ledger, "run-a", range(1, 3))
    ledger.path.unlink()  # the marker stays

    for access in (
        lambda: ledger.check_round("run-a", STEPS, RATE, NOISE, DELTA),
        ledger.summary,
        lambda: ledger.set_budget(100.0, DELTA),
        lambda: ledger.create(100.0, DELTA),
    ):
        with pytest.raises(PrivacyError) as lost:
            access()
        message = str(lost.value)
        assert f"privacy ledger {ledger.path} is missing" in message and "2 release(s)" in message
        assert "Restore the latest backup of BOTH" in message and ledger.marker_path.name in message
    assert not ledger.path.exists()


def test_older_copy_of_the_ledger_is_refused(ledger: PrivacyLedger) -> None:
    train_rounds(ledger, "run-a", range(1, 2))
    backup = ledger.path.read_bytes()
    train_rounds(ledger, "run-a", range(2, 3))
    ledger.path.write_bytes(backup)  # restored from an older copy: one round of spending forgotten

    with pytest.raises(PrivacyError, match="is older than its marker") as rolled_back:
        ledger.reserve("run-a", 3, **ROUND)
    assert str(ledger.path) in str(rolled_back.value) and "rolled back" in str(rolled_back.value)
    assert ledger.path.read_bytes() == backup


def test_edited_ledger_and_lost_marker_are_refused(ledger: PrivacyLedger) -> None:
    train_rounds(ledger, "run-a", range(1, 3))
    latest = ledger.path.read_text()
    doc = json.loads(latest)
    doc["releases"][0]["steps"] = 1  # same generation and releases: caught by the digest
    ledger.path.write_text(json.dumps(doc))
    with pytest.raises(PrivacyError, match="was edited or replaced"):
        ledger.summary()

    ledger.path.write_text(latest)
    assert ledger.verify()
    ledger.marker_path.unlink()
    with pytest.raises(PrivacyError, match="has lost its marker"):
        ledger.check_round("run-a", STEPS, RATE, NOISE, DELTA)


def test_a_failed_marker_write_leaves_a_current_ledger(
    ledger: PrivacyLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    import privacy.privacy_ledger as ledger_module

    real_write = ledger_module.atomic_write_text

    def marker_disk_full(path: Path, text: str) -> None:
        if path == ledger.marker_path:
            raise OSError("disk full")
        real_write(path, text)

    monkeypatch.setattr(ledger_module, "atomic_write_text", marker_disk_full)
    with pytest.raises(OSError, match="disk full"):
        ledger.reserve("run-a", 1, **ROUND)
    monkeypatch.undo()
    # The ledger (written first) is ahead of its marker: current, and its reservation counts.
    assert ledger.verify() and len(ledger.releases()) == 1
    train_rounds(ledger, "run-a", range(2, 3))
    assert ledger.run_epsilon("run-a") == pytest.approx(epsilon_after(2))


def test_a_version_1_ledger_is_read_and_gets_its_marker(tmp_path: Path) -> None:
    path = tmp_path / "privacy-ledger.jsonl"
    budget = {"epsilon": 50.0, "delta": 1e-5, "set_at": "2025-01-01T00:00:00+00:00"}
    path.write_text(
        json.dumps({"format": "neurofed-privacy-ledger", "version": 1, "budget": budget, "releases": []})
    )
    ledger = PrivacyLedger(path)
    assert ledger.verify() and not ledger.marker_path.exists()
    train_rounds(ledger, "run-a", range(1, 2))
    assert json.loads(path.read_text())["version"] == 2 and ledger.marker_path.is_file()
    assert ledger.lifetime_epsilon() == pytest.approx(epsilon_after(1))


# --- setting a site up: `neurofed-site budget --init` and the site's use of its ledger ------------------


def test_budget_init_creates_ledger_and_secret_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    path = state / "privacy-ledger.jsonl"
    init = ["budget", "--init", "--ledger", str(path), "--set-budget", "10", "--delta", "1e-5"]
    assert site_main(init) == 0
    ledger = PrivacyLedger(path)
    assert ledger.verify() and (ledger.budget().epsilon, ledger.budget().delta) == (10.0, 1e-5)
    secret = state / SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes()) == 32
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert "site secret" in capsys.readouterr().out

    train_rounds(ledger, "run-a", range(1, 2))
    files = {p: p.read_bytes() for p in (path, ledger.marker_path, secret)}
    assert site_main(init) == 2
    err = capsys.readouterr().err
    assert f"{path} already exists" in err and "never created again" in err
    assert {p: p.read_bytes() for p in files} == files


def _site(tmp_path: Path, *, simulated: bool, budget: tuple[float, float] | None = None) -> SiteSetup:
    state = tmp_path / "state"
    return SiteSetup("site-a", "train", tmp_path / "data", None, state, simulated, budget=budget)


def test_a_deployed_site_never_initialised_is_refused(tmp_path: Path) -> None:
    setup = _site(tmp_path, simulated=False, budget=(10.0, 1e-5))
    with pytest.raises(NeurofedError) as refused:
        prepare_ledger(setup)
    message = str(refused.value)
    assert f"neurofed-site budget --init --ledger {setup.ledger.path}" in message and "site-a" in message
    assert not setup.ledger.path.exists() and not setup.state_dir.exists()


def test_an_initialised_deployed_site_takes_its_budget_from_the_node_config(tmp_path: Path) -> None:
    setup = _site(tmp_path, simulated=False, budget=(12.0, 1e-6))
    init_site(setup.ledger.path, 10.0, 1e-5)
    ledger = prepare_ledger(setup)
    assert (ledger.budget().epsilon, ledger.budget().delta) == (12.0, 1e-6)

    train_rounds(ledger, "run-a", range(1, 2))
    ledger.path.unlink()
    with pytest.raises(NeurofedError, match=f"privacy ledger {ledger.path} is missing"):
        prepare_ledger(setup)


def test_a_simulated_site_creates_its_ledger_but_not_over_a_lost_one(tmp_path: Path) -> None:
    setup = _site(tmp_path, simulated=True)
    ledger = prepare_ledger(setup)
    assert ledger.verify() and (ledger.budget().epsilon, ledger.budget().delta) == SIMULATED_BUDGET
    ledger.path.unlink()
    with pytest.raises(NeurofedError, match="is missing"):
        prepare_ledger(setup)
