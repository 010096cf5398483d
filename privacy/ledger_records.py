"""What a site's privacy ledger holds, and whether one more round fits the site's lifetime budget.

The ledger document (``{"format", "version", "budget", "releases"}``) as typed records: the lifetime
budget, one `Release` per round trained, per-run and total spending; and `decide_round`, the budget rule:
within a run rounds compose by the run's RDP accountant; across runs ε and δ add (basic composition), and
both sums must stay within the budget. The file that stores the document is privacy/privacy_ledger.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from privacy.accounting import check_privacy_parameters, history_epsilon
from privacy.errors import PrivacyError

LEDGER_FORMAT = "neurofed-privacy-ledger"
LEDGER_VERSION = 1
# Sums of per-run δ are compared with a little slack for floating-point rounding (10 x 1e-6 > 1e-5).
_DELTA_SLACK = 1e-9

ReleaseStatus = Literal["reserved", "committed"]


@dataclass(frozen=True)
class LifetimeBudget:
    """What the site allows all runs on its data to spend together: (ε, δ) by basic composition."""

    epsilon: float
    delta: float
    set_at: str


@dataclass(frozen=True)
class Release:
    """One round trained on the site's data (a model update sent, or about to be).

    Attributes:
        id: position in the ledger (0, 1, ...).
        run_id: the federated run.
        server_round: the coordinator's round number.
        steps: DP-SGD steps of the round (planned while reserved, taken once committed).
        sample_rate: probability that a subject is in a step's batch.
        noise_multiplier: Gaussian noise std / clipping norm.
        delta: the run's δ.
        epsilon_run: the run's cumulative ε at ``delta`` after this round, as recorded.
        status: ``"reserved"`` (training, or crashed: counts as spent) or ``"committed"``.
        reserved_at, committed_at: UTC times, ISO 8601.
    """

    id: int
    run_id: str
    server_round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    delta: float
    epsilon_run: float
    status: ReleaseStatus
    reserved_at: str
    committed_at: str | None = None

    @property
    def segment(self) -> tuple[float, float, int]:
        """``(noise_multiplier, sample_rate, steps)`` for the accountant."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Decision:
    """Whether a round may be trained, and why.

    Attributes:
        allowed: the round fits the lifetime budget.
        reason: one sentence, for the operator's log and, if refused, the coordinator.
        epsilon_after: the run's cumulative ε after the round.
        lifetime_epsilon_after: the site's spent ε (all runs) after the round.
    """

    allowed: bool
    reason: str
    epsilon_after: float
    lifetime_epsilon_after: float


@dataclass(frozen=True)
class RunSummary:
    """Spending of one run: ``rounds`` committed, ``uncommitted`` reservations (counted as spent)."""

    run_id: str
    rounds: int
    uncommitted: int
    steps: int
    delta: float
    epsilon: float
    last_release_at: str


@dataclass(frozen=True)
class LedgerSummary:
    """All runs' spending against the lifetime budget (``left_epsilon`` is None without a budget)."""

    budget: LifetimeBudget | None
    runs: list[RunSummary]
    spent_epsilon: float
    spent_delta: float
    left_epsilon: float | None


def decide_round(
    doc: dict, path: Path, run_id: str, steps: int, sample_rate: float, noise_multiplier: float, delta: float
) -> Decision:
    check_privacy_parameters(
        steps=steps, sample_rate=sample_rate, noise_multiplier=noise_multiplier, delta=delta
    )
    budget = budget_from(doc, path)
    runs = by_run(releases_from(doc, path))
    this_run = runs.get(run_id, [])
    run_after = history_epsilon(
        [*(r.segment for r in this_run), (noise_multiplier, sample_rate, steps)], delta
    )
    others = {rid: rs for rid, rs in runs.items() if rid != run_id}
    others_epsilon = sum(run_summary(rid, rs).epsilon for rid, rs in others.items())
    others_delta = sum(rs[0].delta for rs in others.values())
    lifetime_after = others_epsilon + run_after
    spent = others_epsilon + (run_summary(run_id, this_run).epsilon if this_run else 0.0)
    what = f"this round of run {run_id!r} ({steps} steps, sample rate {sample_rate:.4g}, noise {noise_multiplier:.4g})"

    def refuse(why: str) -> Decision:
        return Decision(False, f"privacy budget: {what} is refused: {why}", run_after, lifetime_after)

    if budget is None:
        return refuse(
            f"the site has no lifetime privacy budget; the operator sets one with "
            f"`neurofed-site budget --ledger {path} --set-budget EPS --delta D`"
        )
    if this_run and this_run[0].delta != delta:
        return refuse(f"δ={delta:g} differs from the run's δ={this_run[0].delta:g}; a run keeps one δ")
    if others_delta + delta > budget.delta * (1 + _DELTA_SLACK):
        return refuse(
            f"runs' δ add up: {others_delta:g} spent by other runs + {delta:g} > the budget's δ={budget.delta:g}; "
            "use a smaller δ per run"
        )
    if not lifetime_after <= budget.epsilon:
        return refuse(
            f"it would raise the site's spent ε from {spent:.3f} to {lifetime_after:.3f} (run ε {run_after:.3f}), "
            f"above the lifetime budget ε={budget.epsilon:g} (δ={budget.delta:g}); {max(budget.epsilon - spent, 0):.3f} "
            "is left. Train fewer steps or with more noise, or the operator raises the budget with "
            f"`neurofed-site budget --ledger {path} --set-budget EPS --delta D`"
        )
    reason = (
        f"privacy budget: {what} brings the site's spent ε to {lifetime_after:.3f} of {budget.epsilon:g} "
        f"(run ε {run_after:.3f}, δ={delta:g})"
    )
    return Decision(True, reason, run_after, lifetime_after)


def budget_from(doc: dict, path: Path) -> LifetimeBudget | None:
    raw = doc.get("budget")
    if raw is None:
        return None
    try:
        return LifetimeBudget(float(raw["epsilon"]), float(raw["delta"]), str(raw["set_at"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise damaged(path, f"its budget is unreadable ({exc!r})") from exc


def releases_from(doc: dict, path: Path) -> list[Release]:
    releases = []
    for i, raw in enumerate(doc["releases"]):
        try:
            release = Release(**raw)
            if release.id != i or release.status not in ("reserved", "committed") or release.steps < 0:
                raise ValueError(f"id {release.id}, status {release.status!r}, steps {release.steps}")
        except (TypeError, ValueError) as exc:
            raise damaged(path, f"release {i} is unreadable ({exc})") from exc
        releases.append(release)
    return releases


def release_to_json(release: Release) -> dict:
    return asdict(release)


def by_run(releases: Sequence[Release]) -> dict[str, list[Release]]:
    runs: dict[str, list[Release]] = {}
    for release in releases:
        runs.setdefault(release.run_id, []).append(release)
    return runs


def run_summary(run_id: str, releases: Sequence[Release]) -> RunSummary:
    return RunSummary(
        run_id=run_id,
        rounds=sum(r.status == "committed" for r in releases),
        uncommitted=sum(r.status == "reserved" for r in releases),
        steps=sum(r.steps for r in releases),
        delta=releases[0].delta,
        epsilon=history_epsilon([r.segment for r in releases], releases[0].delta),
        last_release_at=max(r.committed_at or r.reserved_at for r in releases),
    )


def damaged(path: Path, what: str) -> PrivacyError:
    return PrivacyError(
        f"privacy ledger {path} cannot be read: {what}. Restore it from the site's backup; do not delete "
        "or edit it: the spending it records would be lost"
    )
