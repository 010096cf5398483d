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

Every write replaces the whole file atomically (temporary file in the same folder, fsync, ``os.replace``:
common/atomic_files.py; then fsync of the folder) under an exclusive lock, so the file on disk is always a
complete ledger. The records, and the budget rule, are in privacy/ledger_records.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from common.atomic_files import atomic_write_text
from privacy.accounting import check_privacy_parameters, history_epsilon
from privacy.errors import PrivacyBudgetExceeded, PrivacyError
from privacy.ledger_records import (
    LEDGER_FORMAT,
    LEDGER_VERSION,
    Decision,
    LedgerSummary,
    LifetimeBudget,
    Release,
    RunSummary,
    budget_from,
    by_run,
    damaged,
    decide_round,
    release_to_json,
    releases_from,
    run_summary,
)


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
        return budget_from(self._read(), self.path)

    def releases(self, run_id: str | None = None) -> list[Release]:
        """Every release in the order recorded, or only ``run_id``'s."""
        releases = releases_from(self._read(), self.path)
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
        budget = budget_from(doc, self.path)
        runs = [run_summary(run_id, rs) for run_id, rs in by_run(releases_from(doc, self.path)).items()]
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
        return decide_round(self._read(), self.path, run_id, steps, sample_rate, noise_multiplier, delta)

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
            decision = decide_round(doc, self.path, run_id, steps, sample_rate, noise_multiplier, delta)
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
            doc["releases"].append(release_to_json(release))
            self._write(doc)
        return release

    def commit(self, release: Release, steps: int | None = None) -> Release:
        """Mark a reservation as trained, with the ``steps`` actually taken (default: as reserved).

        Taking more steps than reserved is an error (the reservation, counted as spent, stays).
        """
        with self._locked() as doc:
            releases = releases_from(doc, self.path)
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
            doc["releases"][stored.id] = release_to_json(committed)
            self._write(doc)
        return committed

    @contextmanager
    def reserved_round(self, run_id: str, server_round: int, **spending: float) -> Iterator[Release]:
        """Reserve the round, yield its reservation, and commit it if the block finishes without error.

        ``spending``: `reserve`'s keyword arguments (steps, sample_rate, noise_multiplier, delta). If the
        block raises (or the process dies), the reservation stays and counts as spent.
        """
        release = self.reserve(run_id, server_round, **spending)
        yield release
        self.commit(release)

    # -- file

    def _read(self) -> dict:
        if not self.path.exists():
            return {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "budget": None, "releases": []}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise damaged(self.path, str(exc)) from exc
        if not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT:
            raise damaged(self.path, f"it is not a {LEDGER_FORMAT} file")
        if doc.get("version") != LEDGER_VERSION:
            raise PrivacyError(
                f"{self.path}: privacy ledger version {doc.get('version')} is not supported by this neurofed "
                f"(it reads version {LEDGER_VERSION}); use the neurofed release that wrote it"
            )
        if not isinstance(doc.get("releases"), list):
            raise damaged(self.path, "it has no list of releases")
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
        atomic_write_text(self.path, json.dumps(doc, indent=1) + "\n")
        _fsync_folder(self.path.parent)


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
