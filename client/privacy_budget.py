"""`neurofed-site budget`: set up the site's privacy ledger once, set its lifetime budget, show its spending.

``--init`` (once per site) creates the ledger, its marker and the lifetime budget, and the site's secret
(client/site_secret.py) in the ledger's folder, the site's state folder; it never overwrites a ledger.
Without ``--init`` the ledger must already exist: a missing, rolled-back or edited ledger is an error
naming the files (privacy/privacy_ledger.py), never an empty ledger.

What it shows: each run's own ε at the run's δ (what the run reports), and the site's *lifetime* ε at the
lifetime δ: every release of every run composed in one RDP accountant and converted once. That composed
figure, not a sum over runs, is what the budget bounds and what "left" is computed from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from client.site_secret import SiteSecret, secret_path
from models.errors import NeurofedError
from privacy.accounting import check_privacy_parameters
from privacy.errors import PrivacyError
from privacy.privacy_ledger import LedgerSummary, LifetimeBudget, PrivacyLedger

PLAIN_OUTPUT_WIDTH = 200
"""Columns of the table when output goes to a file or pipe, where nothing should wrap."""


def init_command(ledger_path: Path | str) -> str:
    """The command that sets up a deployed site's ledger and secret (named by every error that needs it)."""
    return f"neurofed-site budget --init --ledger {ledger_path} --set-budget EPS --delta D"


@dataclass(frozen=True)
class InitialisedSite:
    """What `init_site` made: the ledger (and marker) with its budget, and the site secret."""

    budget: LifetimeBudget
    ledger: Path
    marker: Path
    secret: Path
    secret_created: bool
    """False when a secret was already in the state folder (kept: a secret is never replaced)."""


def init_site(ledger_path: Path, epsilon: float, delta: float) -> InitialisedSite:
    """Create the site's ledger with lifetime budget (``epsilon``, ``delta``), and its secret beside it.

    The state folder is the ledger's folder (``<state-dir>/privacy-ledger.jsonl``), created mode 0700
    if missing. Raises PrivacyError, changing nothing, if the ledger or its marker exists. The ledger is
    made first: a secret already in the folder is kept (a secret is never replaced).
    """
    check_privacy_parameters(epsilon=epsilon, delta=delta)
    ledger = PrivacyLedger(ledger_path)
    state_dir = ledger.path.parent
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise NeurofedError(
            f"--ledger {ledger.path}: cannot create folder {state_dir} ({exc.strerror})"
        ) from exc
    budget = ledger.create(epsilon, delta)
    secret_created = not secret_path(state_dir).is_file()
    SiteSecret.load_or_create(state_dir)
    return InitialisedSite(budget, ledger.path, ledger.marker_path, secret_path(state_dir), secret_created)


def run_budget(
    ledger_path: Path,
    set_epsilon: float | None = None,
    delta: float | None = None,
    console: Console | None = None,
    *,
    init: bool = False,
) -> int:
    """Set the site up (``init``) or set its lifetime budget (``set_epsilon``), then print its spending.

    Returns:
        0; NeurofedError for a missing, stale or unreadable ledger, or bad options.
    """
    console = console or _default_console()
    ledger = PrivacyLedger(ledger_path)
    try:
        _check_options(init, set_epsilon, delta)
        if init:
            site = init_site(ledger_path, set_epsilon, delta)
            secret = "made" if site.secret_created else "kept (one was there)"
            console.print(
                f"set up {site.ledger} (marker {site.marker.name}) with lifetime budget "
                f"ε={site.budget.epsilon:g}, δ={site.budget.delta:g}; site secret {site.secret} {secret}. "
                "Back up these three files together."
            )
        elif not ledger.verify():
            raise NeurofedError(
                f"no privacy ledger at {ledger_path}. `neurofed-site start` keeps it in its --state-dir, as "
                f"<state-dir>/privacy-ledger.jsonl: check the path. A holdout site (--role holdout) never "
                f"trains and needs none; a training site is set up once with `{init_command(ledger_path)}`"
            )
        elif set_epsilon is not None:
            budget = ledger.set_budget(set_epsilon, delta)
            console.print(f"lifetime budget of {ledger_path} set to ε={budget.epsilon:g}, δ={budget.delta:g}")
        summary = ledger.summary()
    except PrivacyError as exc:
        raise NeurofedError(str(exc)) from exc
    _print_summary(summary, ledger_path, console)
    return 0


def _check_options(init: bool, set_epsilon: float | None, delta: float | None) -> None:
    if init and (set_epsilon is None or delta is None):
        raise NeurofedError("--init needs the lifetime budget: --set-budget EPS --delta D (e.g. 10 and 1e-5)")
    if set_epsilon is not None and delta is None:
        raise NeurofedError("--set-budget needs --delta (the lifetime δ, e.g. 1e-5)")
    if set_epsilon is None and delta is not None:
        raise NeurofedError("--delta is only used with --set-budget EPS")
    if set_epsilon is not None:
        check_privacy_parameters(epsilon=set_epsilon, delta=delta)


def _print_summary(summary: LedgerSummary, ledger_path: Path, console: Console) -> None:
    table = Table(
        title=f"Privacy spending per run in {ledger_path} (run ε: at the run's δ)",
        title_justify="left",
    )
    table.add_column("run", no_wrap=True)
    table.add_column("rounds", justify="right")
    table.add_column("uncommitted", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("run δ", justify="right")
    table.add_column("run ε", justify="right")
    table.add_column("last release (UTC)", no_wrap=True)
    for run in summary.runs:
        table.add_row(
            run.run_id,
            str(run.rounds),
            Text(str(run.uncommitted), style="yellow" if run.uncommitted else ""),
            str(run.steps),
            f"{run.delta:g}",
            _epsilon(run.epsilon),
            run.last_release_at,
        )
    if summary.runs:
        console.print(table)
    else:
        console.print(f"no releases recorded in {ledger_path}")
    if any(run.uncommitted for run in summary.runs):
        console.print(
            Text(
                "uncommitted: rounds reserved but never completed (e.g. a crash); they count as spent",
                "yellow",
            )
        )
    if summary.budget is None:
        console.print(Text("no lifetime budget set: the site trains no DP round until one is", "bold red"))
        console.print(f"set it with: neurofed-site budget --ledger {ledger_path} --set-budget EPS --delta D")
        return
    budget, left = summary.budget, summary.left_epsilon
    composed = (
        f"all releases of all {len(summary.runs)} run(s) composed in one RDP accountant (not a sum of the "
        "runs' ε or δ)"
        if summary.runs
        else "nothing released yet"
    )
    console.print(
        f"lifetime ε={_epsilon(summary.spent_epsilon)} at the lifetime δ={budget.delta:g}: {composed}"
    )
    console.print(
        Text(
            f"lifetime budget ε={budget.epsilon:g} at δ={budget.delta:g}; left ε={_epsilon(max(left, 0.0))}",
            style="bold green" if left > 0 else "bold red",
        )
    )


def _epsilon(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3f}"


def _default_console() -> Console:
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, PLAIN_OUTPUT_WIDTH))
    return console
