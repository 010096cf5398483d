"""The site's privacy ledger: every release of a model trained on the site's data, and the lifetime budget.

A JSON file owned by the site (never by the coordinator). Each federated round a site trains is a
*release*: run id, round, DP-SGD steps, sample rate, noise multiplier, the run's δ, and the run's
cumulative ε after it. Before training a round the site *reserves* it (recorded as if the round
completes: the worst case); after training it *commits* it. A reservation that is never committed (a
crash mid-round) stays in the ledger and counts as spent, so a crash can over-count but never under-count.

Composition: Rényi DP adds up over every release of every run on the same data, so the lifetime budget
(ε_max, δ_max) is checked on ALL releases composed in one RDP accountant and converted to (ε, δ) once, at
the lifetime δ_max; the δ of runs is never summed (privacy/ledger_records.py, `decide_round`). Each run's
own ε, at the run's δ, is what the run reports.

Loss and rollback: beside the ledger, its *marker* (``<ledger>.marker``, `MARKER_SUFFIX`) records the
ledger's write count (``generation``), its number of releases and the SHA-256 of its bytes, rewritten after
every write. A missing ledger whose marker exists, a ledger behind its marker (an older copy restored), or
one edited since its last write is refused with a PrivacyError naming both files: the site restores the
latest backup of both, and never re-creates the ledger. (Without ledger and marker a ledger is simply
not set up; whether the site may create it is the caller's choice: `create` refuses to overwrite.)

Every write replaces each file atomically (temporary file in the same folder, fsync, ``os.replace``:
common/atomic_files.py; then fsync of the folder) under an exclusive lock, the ledger before its marker,
so the files on disk are always complete and the ledger is never behind its marker. Readers read the
marker first, then the ledger, so a concurrent write never looks like a rollback.
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
from privacy.accounting import check_privacy_parameters, history_epsilon, smallest_noise_multiplier
from privacy.errors import PrivacyBudgetExceeded, PrivacyError
from privacy.ledger_records import (
    LEDGER_FORMAT,
    LEDGER_VERSION,
    READABLE_VERSIONS,
    Decision,
    LedgerMarker,
    LedgerSummary,
    LifetimeBudget,
    Release,
    RunSummary,
    budget_from,
    by_run,
    check_against_marker,
    damaged,
    damaged_marker,
    decide_round,
    lifetime_epsilon,
    lost_ledger,
    marker_from_text,
    marker_of,
    marker_to_text,
    release_to_json,
    releases_from,
    run_summary,
)

MARKER_SUFFIX = ".marker"
"""The marker of ledger ``privacy-ledger.jsonl`` is ``privacy-ledger.jsonl.marker``, in the same folder."""


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

    @property
    def marker_path(self) -> Path:
        """The marker file beside the ledger (back it up with the ledger)."""
        return self.path.with_name(self.path.name + MARKER_SUFFIX)

    # -- reading

    def exists(self) -> bool:
        """Whether the ledger file exists (it may still be stale: `verify` checks it against its marker)."""
        return self.path.is_file()

    def verify(self) -> bool:
        """True if the ledger exists and is its latest version; False if neither it nor its marker exists.

        Raises PrivacyError (naming the files and what to do) if the ledger is missing while its marker
        exists, is older than its marker (rolled back), was edited, or is damaged.
        """
        self._read()
        return self.exists()

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

    def lifetime_epsilon(self) -> float | None:
        """The site's lifetime ε: every release of every run composed (RDP), at the budget's lifetime δ.

        None without a budget (there is no lifetime δ to convert at).
        """
        return self.summary().spent_epsilon

    def summary(self) -> LedgerSummary:
        """Each run's own ε (at the run's δ), the lifetime ε (all runs composed, at the lifetime δ), and
        what is left of the lifetime budget."""
        doc = self._read()
        budget = budget_from(doc, self.path)
        releases = releases_from(doc, self.path)
        runs = [run_summary(run_id, rs) for run_id, rs in by_run(releases).items()]
        if budget is None:
            return LedgerSummary(None, runs, None, None)
        spent = lifetime_epsilon([r.segment for r in releases], budget.delta)
        return LedgerSummary(budget, runs, spent, budget.epsilon - spent)

    def largest_new_run_epsilon(self, sample_rate: float, steps: int, run_delta: float) -> float:
        """The largest ε (at ``run_delta``) a new run of ``steps`` steps at ``sample_rate`` may plan and
        still fit the lifetime budget, composed with everything released so far; 0 when none fits.

        What a refusal tells the coordinator to ask for (``dp-target-epsilon``)."""
        doc = self._read()
        budget = budget_from(doc, self.path)
        if budget is None:
            return 0.0
        released = [r.segment for r in releases_from(doc, self.path)]
        noise = smallest_noise_multiplier(  # advice: 1 % is close enough, and each try is costly
            lambda z: lifetime_epsilon([*released, (z, sample_rate, steps)], budget.delta) <= budget.epsilon,
            tolerance=1e-2,
        )
        return 0.0 if noise is None else history_epsilon([(noise, sample_rate, steps)], run_delta)

    def check_round(
        self, run_id: str, steps: int, sample_rate: float, noise_multiplier: float, delta: float
    ) -> Decision:
        """Whether one more round of ``run_id`` fits the lifetime budget (recording nothing).

        The round is counted as if it completes all ``steps`` steps. Refused when no budget is set, when
        ``delta`` differs from the run's earlier δ, or when the lifetime ε after it (every release of every
        run and this round composed by RDP, at the lifetime δ) would exceed the budget's ε.
        """
        return decide_round(self._read(), self.path, run_id, steps, sample_rate, noise_multiplier, delta)

    # -- writing

    def create(self, epsilon: float, delta: float) -> LifetimeBudget:
        """Create the ledger (and its marker) with the lifetime budget; PrivacyError if either file exists."""
        check_privacy_parameters(epsilon=epsilon, delta=delta)
        with self._locked() as doc:
            existing = [p for p in (self.path, self.marker_path) if p.exists()]
            if existing:
                raise PrivacyError(
                    f"{existing[0]} already exists: this site's privacy ledger is set up, and it is never "
                    "created again (that would reset its spending). Show it with `neurofed-site budget "
                    f"--ledger {self.path}`, or change the budget with --set-budget EPS --delta D (without --init)"
                )
            return self._write_budget(doc, epsilon, delta)

    def set_budget(self, epsilon: float, delta: float) -> LifetimeBudget:
        """Set the lifetime budget (ε_max, δ_max) for all runs on this site's data.

        Creates the ledger if neither it nor its marker exists (callers that must not create one check
        `verify` first); refuses, like every access, a ledger that is lost or rolled back.
        """
        check_privacy_parameters(epsilon=epsilon, delta=delta)
        with self._locked() as doc:
            return self._write_budget(doc, epsilon, delta)

    def _write_budget(self, doc: dict, epsilon: float, delta: float) -> LifetimeBudget:
        budget = LifetimeBudget(float(epsilon), float(delta), _now())
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
        """The ledger document, checked against its marker (read first: see the module docstring)."""
        marker = self._read_marker()
        try:
            ledger_bytes = self.path.read_bytes()
        except FileNotFoundError:
            if marker is not None:
                raise lost_ledger(self.path, self.marker_path, marker) from None
            return {
                "format": LEDGER_FORMAT,
                "version": LEDGER_VERSION,
                "generation": 0,
                "budget": None,
                "releases": [],
            }
        except OSError as exc:
            raise damaged(self.path, str(exc)) from exc
        try:
            doc = json.loads(ledger_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise damaged(self.path, str(exc)) from exc
        if not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT:
            raise damaged(self.path, f"it is not a {LEDGER_FORMAT} file")
        if doc.get("version") not in READABLE_VERSIONS:
            raise PrivacyError(
                f"{self.path}: privacy ledger version {doc.get('version')} is not supported by this neurofed "
                f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))}); use the neurofed release that "
                "wrote it"
            )
        if not isinstance(doc.get("releases"), list) or not isinstance(doc.get("generation", 0), int):
            raise damaged(self.path, "it has no list of releases or no whole-number generation")
        check_against_marker(doc, ledger_bytes, marker, self.path, self.marker_path)
        return doc

    def _read_marker(self) -> LedgerMarker | None:
        try:
            text = self.marker_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise damaged_marker(self.marker_path, self.path, str(exc)) from exc
        return marker_from_text(text, self.marker_path, self.path)

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
        """Write the document as the next generation, then its marker (each atomically and durably)."""
        doc["version"] = LEDGER_VERSION
        doc["generation"] = int(doc.get("generation", 0)) + 1
        text = json.dumps(doc, indent=1) + "\n"
        atomic_write_text(self.path, text)
        _fsync_folder(self.path.parent)
        marker = marker_of(doc, text.encode("utf-8"), _now())
        atomic_write_text(self.marker_path, marker_to_text(marker))
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
    "MARKER_SUFFIX",
    "Decision",
    "LedgerMarker",
    "LedgerSummary",
    "LifetimeBudget",
    "PrivacyLedger",
    "Release",
    "RunSummary",
]
