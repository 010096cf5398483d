"""The site's privacy ledger: every release of a model trained on the site's data, and the lifetime budget.

A JSON file owned by the site (never by the coordinator). Each federated round a site trains is a
*release*: run id, round, DP-SGD steps, sample rate, noise multiplier, δ, and the run's cumulative ε after
it. Before training a round the site *reserves* it (recorded as if the round completes: the worst case);
after training it *commits* it. A reservation that is never committed (a crash mid-round) stays in the
ledger and counts as spent, so a crash can over-count but never under-count.

Composition: within a run, rounds compose by the run's RDP accountant (ε is cumulative for the run).
Across runs on the same data, basic composition applies: (ε₁, δ₁) and (ε₂, δ₂) give (ε₁ + ε₂, δ₁ + δ₂), so
the ε of different runs ADD, and so do their δ. The operator's lifetime budget (ε_max, δ_max) bounds both
sums; a round that would exceed either is refused with a reason the site sends to the coordinator.

Every write replaces the whole file atomically (temporary file in the same folder, fsync, ``os.replace``,
fsync of the folder) under an exclusive lock, so the file on disk is always a complete ledger.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from privacy.accounting import check_privacy_parameters, history_epsilon
from privacy.errors import PrivacyBudgetExceeded, PrivacyError

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


class PrivacyLedger:
    """The privacy ledger file at ``path`` (created on the first write; its folder must exist).

    Typical use by the site, each round::

        decision = ledger.check_round(run_id, steps, sample_rate, noise_multiplier, delta)
        if not decision.allowed: decline the round with decision.reason
        with ledger.reserved_round(run_id, server_round, steps=..., sample_rate=..., ...):
            train the round (a DP accountant continued from ledger.accountant_state(run_id))
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    # -- reading

    def exists(self) -> bool:
        return self.path.is_file()

    def budget(self) -> LifetimeBudget | None:
        """The lifetime budget the operator set, or None."""
        return _budget_from(self._read(), self.path)

    def releases(self, run_id: str | None = None) -> list[Release]:
        """Every release in the order recorded, or only ``run_id``'s."""
        releases = _releases_from(self._read(), self.path)
        return [r for r in releases if run_id is None or r.run_id == run_id]

    def accountant_state(self, run_id: str) -> dict | None:
        """The run's RDP accountant state (``{"mechanism", "history"}``) from its releases; None if new.

        Uncommitted reservations are included (worst case), so a resumed run continues the count.
        """
        releases = self.releases(run_id)
        if not releases:
            return None
        return {"mechanism": "rdp", "history": [list(r.segment) for r in releases]}

    def run_epsilon(self, run_id: str) -> float:
        """The run's cumulative ε at its δ (0 for a run without releases)."""
        releases = self.releases(run_id)
        return history_epsilon([r.segment for r in releases], releases[0].delta) if releases else 0.0

    def summary(self) -> LedgerSummary:
        """Spending per run and in total, and what is left of the lifetime budget."""
        doc = self._read()
        budget = _budget_from(doc, self.path)
        runs = [_run_summary(run_id, rs) for run_id, rs in _by_run(_releases_from(doc, self.path)).items()]
        spent_epsilon = sum(r.epsilon for r in runs)
        spent_delta = sum(r.delta for r in runs)
        left = None if budget is None else budget.epsilon - spent_epsilon
        return LedgerSummary(budget, runs, spent_epsilon, spent_delta, left)

    def check_round(
        self, run_id: str, steps: int, sample_rate: float, noise_multiplier: float, delta: float
    ) -> Decision:
        """Whether one more round of ``run_id`` fits the lifetime budget (recording nothing).

        The round is counted as if it completes all ``steps`` steps. Refused when no budget is set, when
        ``delta`` differs from the run's earlier δ, or when the site's ε or δ summed over all runs (basic
        composition) would exceed the budget.
        """
        return _decide(self._read(), self.path, run_id, steps, sample_rate, noise_multiplier, delta)

    # -- writing

    def set_budget(self, epsilon: float, delta: float) -> LifetimeBudget:
        """Set the lifetime budget (ε_max, δ_max) for all runs on this site's data."""
        check_privacy_parameters(epsilon=epsilon, delta=delta)
        budget = LifetimeBudget(float(epsilon), float(delta), _now())
        with self._locked() as doc:
            doc["budget"] = asdict(budget)
            self._write(doc)
        return budget

    def reserve(
        self,
        run_id: str,
        server_round: int,
        *,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
        delta: float,
    ) -> Release:
        """Record a round as spent before training it; raises PrivacyBudgetExceeded if it does not fit.

        The reservation is on disk when this returns; if writing fails, it raises and nothing is recorded,
        so the round must not be trained.
        """
        with self._locked() as doc:
            decision = _decide(doc, self.path, run_id, steps, sample_rate, noise_multiplier, delta)
            if not decision.allowed:
                raise PrivacyBudgetExceeded(decision.reason)
            release = Release(
                id=len(doc["releases"]),
                run_id=str(run_id),
                server_round=int(server_round),
                steps=int(steps),
                sample_rate=float(sample_rate),
                noise_multiplier=float(noise_multiplier),
                delta=float(delta),
                epsilon_run=decision.epsilon_after,
                status="reserved",
                reserved_at=_now(),
            )
            doc["releases"].append(_release_to_json(release))
            self._write(doc)
        return release

    def commit(self, release: Release, steps: int | None = None) -> Release:
        """Mark a reservation as trained, with the ``steps`` actually taken (default: as reserved).

        Taking more steps than reserved is an error (the reservation, counted as spent, stays).
        """
        with self._locked() as doc:
            releases = _releases_from(doc, self.path)
            stored = releases[release.id] if 0 <= release.id < len(releases) else None
            if stored is None or (stored.run_id, stored.server_round, stored.reserved_at) != (
                release.run_id,
                release.server_round,
                release.reserved_at,
            ):
                raise PrivacyError(
                    f"{self.path}: no reservation {release.id} of run {release.run_id!r} to commit"
                )
            if stored.status == "committed":
                return stored
            taken = stored.steps if steps is None else int(steps)
            if not 0 <= taken <= stored.steps:
                raise PrivacyError(
                    f"round {stored.server_round} of run {stored.run_id!r} took {taken} steps but reserved "
                    f"{stored.steps}: the ledger keeps the reservation; reserve the real number of steps"
                )
            earlier = [r.segment for r in releases[: stored.id] if r.run_id == stored.run_id]
            committed = Release(
                **{
                    **asdict(stored),
                    "steps": taken,
                    "epsilon_run": history_epsilon(
                        [*earlier, (stored.noise_multiplier, stored.sample_rate, taken)], stored.delta
                    ),
                    "status": "committed",
                    "committed_at": _now(),
                }
            )
            doc["releases"][stored.id] = _release_to_json(committed)
            self._write(doc)
        return committed

    @contextmanager
    def reserved_round(
        self,
        run_id: str,
        server_round: int,
        *,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
        delta: float,
    ) -> Iterator[Release]:
        """Reserve the round, yield its reservation, and commit it if the block finishes without error.

        If the block raises (or the process dies), the reservation stays and counts as spent.
        """
        release = self.reserve(
            run_id,
            server_round,
            steps=steps,
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            delta=delta,
        )
        yield release
        self.commit(release)

    # -- file

    def _read(self) -> dict:
        if not self.path.exists():
            return {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "budget": None, "releases": []}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _damaged(self.path, str(exc)) from exc
        if not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT:
            raise _damaged(self.path, f"it is not a {LEDGER_FORMAT} file")
        if doc.get("version") != LEDGER_VERSION:
            raise PrivacyError(
                f"{self.path}: privacy ledger version {doc.get('version')} is not supported by this neurofed "
                f"(it reads version {LEDGER_VERSION}); use the neurofed release that wrote it"
            )
        if not isinstance(doc.get("releases"), list):
            raise _damaged(self.path, "it has no list of releases")
        return doc

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        """Yield the current document under an exclusive lock (a sibling ``.lock`` file) for read-modify-write."""
        if not self.path.parent.is_dir():
            raise PrivacyError(f"{self.path}: folder {self.path.parent} does not exist; create it first")
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            try:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_EX)
            except ImportError:  # not POSIX: one site process at a time is assumed
                pass
            yield self._read()

    def _write(self, doc: dict) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_folder(self.path.parent)


def _decide(
    doc: dict, path: Path, run_id: str, steps: int, sample_rate: float, noise_multiplier: float, delta: float
) -> Decision:
    check_privacy_parameters(
        steps=steps, sample_rate=sample_rate, noise_multiplier=noise_multiplier, delta=delta
    )
    budget = _budget_from(doc, path)
    runs = _by_run(_releases_from(doc, path))
    this_run = runs.get(run_id, [])
    run_after = history_epsilon(
        [*(r.segment for r in this_run), (noise_multiplier, sample_rate, steps)], delta
    )
    others = {rid: rs for rid, rs in runs.items() if rid != run_id}
    others_epsilon = sum(_run_summary(rid, rs).epsilon for rid, rs in others.items())
    others_delta = sum(rs[0].delta for rs in others.values())
    lifetime_after = others_epsilon + run_after
    spent = others_epsilon + (_run_summary(run_id, this_run).epsilon if this_run else 0.0)
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


def _budget_from(doc: dict, path: Path) -> LifetimeBudget | None:
    raw = doc.get("budget")
    if raw is None:
        return None
    try:
        return LifetimeBudget(float(raw["epsilon"]), float(raw["delta"]), str(raw["set_at"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(path, f"its budget is unreadable ({exc!r})") from exc


def _releases_from(doc: dict, path: Path) -> list[Release]:
    releases = []
    for i, raw in enumerate(doc["releases"]):
        try:
            release = Release(**raw)
            if release.id != i or release.status not in ("reserved", "committed") or release.steps < 0:
                raise ValueError(f"id {release.id}, status {release.status!r}, steps {release.steps}")
        except (TypeError, ValueError) as exc:
            raise _damaged(path, f"release {i} is unreadable ({exc})") from exc
        releases.append(release)
    return releases


def _release_to_json(release: Release) -> dict:
    return asdict(release)


def _by_run(releases: Sequence[Release]) -> dict[str, list[Release]]:
    runs: dict[str, list[Release]] = {}
    for release in releases:
        runs.setdefault(release.run_id, []).append(release)
    return runs


def _run_summary(run_id: str, releases: Sequence[Release]) -> RunSummary:
    return RunSummary(
        run_id=run_id,
        rounds=sum(r.status == "committed" for r in releases),
        uncommitted=sum(r.status == "reserved" for r in releases),
        steps=sum(r.steps for r in releases),
        delta=releases[0].delta,
        epsilon=history_epsilon([r.segment for r in releases], releases[0].delta),
        last_release_at=max(r.committed_at or r.reserved_at for r in releases),
    )


def _damaged(path: Path, what: str) -> PrivacyError:
    return PrivacyError(
        f"privacy ledger {path} cannot be read: {what}. Restore it from the site's backup; do not delete "
        "or edit it: the spending it records would be lost"
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fsync_folder(folder: Path) -> None:
    # The rename itself is durable only once the folder entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "Decision",
    "LedgerSummary",
    "LifetimeBudget",
    "PrivacyLedger",
    "Release",
    "RunSummary",
]
