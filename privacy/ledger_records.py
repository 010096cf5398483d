"""What a site's privacy ledger holds, and whether one more round fits the site's lifetime budget.

The ledger document (``{"format", "version", "generation", "budget", "releases"}``) as typed records: the
lifetime budget, one `Release` per round trained, per-run and lifetime spending; and `decide_round`, the
budget rule. Rényi DP composes additively over every release of every run on the same data, so the
site's lifetime ε is that of ALL releases' ``(noise, sample rate, steps)`` segments in one RDP accountant,
converted to (ε, δ) once, at the budget's lifetime δ. The δ of runs is never summed: a site can take part
in any number of runs at one lifetime δ (e.g. 1e-5). A run's own ε (at the run's δ) is kept for the run's
report. The file that stores the document, and its marker (`LedgerMarker`), is privacy/privacy_ledger.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from privacy.accounting import check_privacy_parameters, history_epsilon
from privacy.errors import PrivacyError

LEDGER_FORMAT = "neurofed-privacy-ledger"
LEDGER_VERSION = 2
"""Version 2 adds ``generation`` (writes so far, matched by the marker) and checks the budget by RDP
composition over all runs at the lifetime δ."""
READABLE_VERSIONS = (1, 2)
"""A version-1 ledger (written before markers) is read with the version-2 rule (sound for any ledger) and
rewritten as version 2, with its marker, at its next change."""
MARKER_FORMAT = "neurofed-privacy-ledger-marker"

ReleaseStatus = Literal["reserved", "committed"]


@dataclass(frozen=True)
class LifetimeBudget:
    """What the site allows all runs on its data to spend together: the lifetime (ε, δ).

    ``epsilon`` bounds the ε of all releases of all runs composed (RDP) and converted at ``delta``, the
    one lifetime δ; ``set_at``: UTC time, ISO 8601.
    """

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
        epsilon_after: the run's cumulative ε after the round, at the run's δ.
        lifetime_epsilon_after: the site's lifetime ε after the round: all releases of all runs composed,
            at the lifetime δ (None when no budget, hence no lifetime δ, is set).
    """

    allowed: bool
    reason: str
    epsilon_after: float
    lifetime_epsilon_after: float | None


@dataclass(frozen=True)
class RunSummary:
    """Spending of one run: ``rounds`` committed, ``uncommitted`` reservations (counted as spent), and the
    run's own cumulative ``epsilon`` at the run's ``delta`` (what the run reports, not the lifetime figure)."""

    run_id: str
    rounds: int
    uncommitted: int
    steps: int
    delta: float
    epsilon: float
    last_release_at: str


@dataclass(frozen=True)
class LedgerSummary:
    """All runs' spending against the lifetime budget.

    Attributes:
        budget: the lifetime budget, or None.
        runs: each run's own spending (ε at the run's δ).
        spent_epsilon: the lifetime ε: every release of every run composed in one RDP accountant and
            converted at the budget's lifetime δ (None without a budget).
        left_epsilon: ``budget.epsilon - spent_epsilon`` (None without a budget; negative if overspent).
    """

    budget: LifetimeBudget | None
    runs: list[RunSummary]
    spent_epsilon: float | None
    left_epsilon: float | None


@dataclass(frozen=True)
class LedgerMarker:
    """What the ledger held at its last write, kept in a file beside it (privacy/privacy_ledger.py).

    A ledger older than its marker was rolled back; a missing ledger whose marker exists was lost.

    Attributes:
        generation: the ledger's writes so far (its ``generation`` field after the write).
        releases: releases the ledger held.
        sha256: hex digest of the ledger file's bytes.
        written_at: UTC time, ISO 8601.
    """

    generation: int
    releases: int
    sha256: str
    written_at: str


def lifetime_epsilon(segments: Sequence[Sequence], lifetime_delta: float) -> float:
    """The site's lifetime ε at ``lifetime_delta``: all ``(noise, sample rate, steps)`` segments, of every
    run, composed in one RDP accountant and converted once (never a sum of per-run ε or δ)."""
    return history_epsilon(segments, lifetime_delta)


def decide_round(
    doc: dict, path: Path, run_id: str, steps: int, sample_rate: float, noise_multiplier: float, delta: float
) -> Decision:
    """Whether one more round (``steps`` steps, counted as completed) fits the lifetime budget.

    Allowed iff a budget is set, ``delta`` is the run's δ, and the lifetime ε after the round (all
    releases, reserved ones included, plus this round, at the lifetime δ) is at most the budget's ε.
    """
    check_privacy_parameters(
        steps=steps, sample_rate=sample_rate, noise_multiplier=noise_multiplier, delta=delta
    )
    budget = budget_from(doc, path)
    releases = releases_from(doc, path)
    this_run = [r for r in releases if r.run_id == run_id]
    new_segment = (noise_multiplier, sample_rate, steps)
    run_after = history_epsilon([*(r.segment for r in this_run), new_segment], delta)
    what = f"this round of run {run_id!r} ({steps} steps, sample rate {sample_rate:.4g}, noise {noise_multiplier:.4g})"
    set_budget = f"`neurofed-site budget --ledger {path} --set-budget EPS --delta D`"

    def refuse(why: str, lifetime_after: float | None) -> Decision:
        return Decision(False, f"privacy budget: {what} is refused: {why}", run_after, lifetime_after)

    if budget is None:
        return refuse(
            f"the site has no lifetime privacy budget; the operator sets one with {set_budget}", None
        )
    spent = lifetime_epsilon([r.segment for r in releases], budget.delta)
    lifetime_after = lifetime_epsilon([*(r.segment for r in releases), new_segment], budget.delta)
    if this_run and this_run[0].delta != delta:
        return refuse(
            f"δ={delta:g} differs from the run's δ={this_run[0].delta:g}; a run keeps one δ", lifetime_after
        )
    if not lifetime_after <= budget.epsilon:
        return refuse(
            f"it would raise the site's lifetime ε (all runs composed, at the lifetime δ={budget.delta:g}) from "
            f"{spent:.3f} to {lifetime_after:.3f}, above the lifetime budget ε={budget.epsilon:g}; "
            f"{max(budget.epsilon - spent, 0):.3f} is left (run ε {run_after:.3f} at the run's δ={delta:g}). "
            "The coordinator asks for less (a smaller dp-target-epsilon, fewer rounds or local steps), or the "
            "site's operator raises the lifetime budget",
            lifetime_after,
        )
    reason = (
        f"privacy budget: {what} brings the site's lifetime ε (all runs composed, at δ={budget.delta:g}) to "
        f"{lifetime_after:.3f} of {budget.epsilon:g} (run ε {run_after:.3f} at the run's δ={delta:g})"
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


def marker_of(doc: dict, ledger_bytes: bytes, written_at: str) -> LedgerMarker:
    """The marker of a ledger document just written as ``ledger_bytes``."""
    return LedgerMarker(
        generation=int(doc["generation"]),
        releases=len(doc["releases"]),
        sha256=hashlib.sha256(ledger_bytes).hexdigest(),
        written_at=written_at,
    )


def marker_to_text(marker: LedgerMarker) -> str:
    return json.dumps({"format": MARKER_FORMAT, **asdict(marker)}, indent=1) + "\n"


def marker_from_text(text: str, marker_path: Path, ledger_path: Path) -> LedgerMarker:
    """The marker in ``text`` (read from ``marker_path``); PrivacyError if it is not a readable marker."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.pop("format", None) != MARKER_FORMAT:
            raise ValueError(f"it is not a {MARKER_FORMAT} file")
        return LedgerMarker(
            int(raw["generation"]), int(raw["releases"]), str(raw["sha256"]), str(raw["written_at"])
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise damaged_marker(marker_path, ledger_path, str(exc)) from exc


def damaged_marker(marker_path: Path, ledger_path: Path, what: str) -> PrivacyError:
    return PrivacyError(
        f"the marker {marker_path} of privacy ledger {ledger_path} cannot be read ({what}). "
        f"{_restore_both(ledger_path, marker_path)}"
    )


def check_against_marker(
    doc: dict, ledger_bytes: bytes, marker: LedgerMarker | None, ledger_path: Path, marker_path: Path
) -> None:
    """Raise PrivacyError unless the ledger read as ``ledger_bytes`` is its latest version.

    The ledger is written before its marker, so a ledger one or more writes ahead of its marker (a crash,
    or a failed marker write, in between) is current. Refused: a ledger behind its marker (rolled back),
    one at the marker's generation with other content (edited or replaced), or a version-2 ledger without
    a marker (a lost marker cannot vouch that the ledger is the latest). A version-1 ledger predates
    markers and is accepted without one.
    """
    restore = _restore_both(ledger_path, marker_path)
    generation, releases = int(doc.get("generation", 0)), len(doc["releases"])
    if marker is None:
        if doc.get("version") == 1:
            return
        interrupted = (
            " (If `neurofed-site budget --init` was interrupted just now, the ledger records no release: "
            "delete it and run --init again.)"
            if releases == 0 and generation == 1
            else ""
        )
        raise PrivacyError(
            f"privacy ledger {ledger_path} has lost its marker {marker_path} (rewritten with every change of "
            f"the ledger): without it an older copy of the ledger cannot be told from the latest, so the site "
            f"trains no DP round. {restore}{interrupted}"
        )
    if generation < marker.generation or releases < marker.releases:
        raise PrivacyError(
            f"privacy ledger {ledger_path} is older than its marker {marker_path}: the ledger is at write "
            f"{generation} with {releases} release(s), the marker says write {marker.generation} with "
            f"{marker.releases} ({marker.written_at}). The ledger was rolled back (an older copy restored), "
            f"which would forget spending, so the site trains no DP round. {restore}"
        )
    if generation == marker.generation and hashlib.sha256(ledger_bytes).hexdigest() != marker.sha256:
        raise PrivacyError(
            f"privacy ledger {ledger_path} was edited or replaced since its last write: its content differs "
            f"from the digest in its marker {marker_path} (write {marker.generation}, {marker.written_at}), "
            f"so the site trains no DP round. {restore}"
        )


def lost_ledger(ledger_path: Path, marker_path: Path, marker: LedgerMarker) -> PrivacyError:
    """The error for a missing ledger whose marker exists: it was deleted or moved, never to be re-created."""
    restore = _restore_both(ledger_path, marker_path)
    return PrivacyError(
        f"privacy ledger {ledger_path} is missing, but its marker {marker_path} says it recorded "
        f"{marker.releases} release(s) (write {marker.generation}, {marker.written_at}): the ledger was "
        f"deleted or moved, and the spending it records would be forgotten, so the site trains no DP round. "
        f"{restore} Do not re-create it with `neurofed-site budget --init`: that would reset the budget"
    )


def _restore_both(ledger_path: Path, marker_path: Path) -> str:
    """What to do about a lost or stale ledger: the sentence every such error ends with."""
    return (
        f"Restore the latest backup of BOTH {ledger_path.name} and {marker_path.name} (backed up together) "
        f"into {ledger_path.parent}; never delete, edit or re-create them."
    )


def damaged(path: Path, what: str) -> PrivacyError:
    return PrivacyError(
        f"privacy ledger {path} cannot be read: {what}. Restore it from the site's backup; do not delete "
        "or edit it: the spending it records would be lost"
    )
