"""`neurofed-site budget`: the site's privacy spending per run and what is left of its lifetime budget."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from models.errors import NeurofedError
from privacy.errors import PrivacyError
from privacy.privacy_ledger import LedgerSummary, PrivacyLedger

PLAIN_OUTPUT_WIDTH = 200
"""Columns of the table when output goes to a file or pipe, where nothing should wrap."""


def run_budget(
    ledger_path: Path,
    set_epsilon: float | None = None,
    delta: float | None = None,
    console: Console | None = None,
) -> int:
    """Set the lifetime budget (if ``set_epsilon`` is given), then print spending per run and what is left.

    Returns:
        0; NeurofedError for a missing or unreadable ledger, or bad options.
    """
    console = console or _default_console()
    ledger = PrivacyLedger(ledger_path)
    try:
        if set_epsilon is not None:
            if delta is None:
                raise NeurofedError("--set-budget needs --delta (the lifetime δ, e.g. 1e-5)")
            budget = ledger.set_budget(set_epsilon, delta)
            console.print(f"lifetime budget of {ledger_path} set to ε={budget.epsilon:g}, δ={budget.delta:g}")
        elif delta is not None:
            raise NeurofedError("--delta is only used with --set-budget EPS")
        elif not ledger.exists():
            raise NeurofedError(
                f"no privacy ledger at {ledger_path}: check the path (the site daemon's --ledger), or create "
                "it by setting the lifetime budget with --set-budget EPS --delta D"
            )
        summary = ledger.summary()
    except PrivacyError as exc:
        raise NeurofedError(str(exc)) from exc
    _print_summary(summary, ledger_path, console)
    return 0


def _print_summary(summary: LedgerSummary, ledger_path: Path, console: Console) -> None:
    table = Table(title=f"Privacy spending recorded in {ledger_path}", title_justify="left")
    table.add_column("run", no_wrap=True)
    table.add_column("rounds", justify="right")
    table.add_column("uncommitted", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("δ", justify="right")
    table.add_column("ε", justify="right")
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
    spent = f"spent ε={_epsilon(summary.spent_epsilon)}, δ={summary.spent_delta:g} (runs add up)"
    if summary.budget is None:
        console.print(
            Text(f"{spent}; no lifetime budget set: the site trains no DP round until one is", "bold red")
        )
        console.print("set it with: neurofed-site budget --ledger PATH --set-budget EPS --delta D")
        return
    left = summary.left_epsilon
    style = "bold green" if left > 0 else "bold red"
    console.print(
        Text(
            f"lifetime budget ε={summary.budget.epsilon:g}, δ={summary.budget.delta:g}; {spent}; "
            f"left ε={_epsilon(max(left, 0.0))}, δ={max(summary.budget.delta - summary.spent_delta, 0.0):g}",
            style=style,
        )
    )


def _epsilon(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3f}"


def _default_console() -> Console:
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, PLAIN_OUTPUT_WIDTH))
    return console
