"""The progress of a federated run, from the events it emits (server/federated_run.py).

One step per stage: preparing the sites (they validate and preprocess their data on the first message),
then each round's training and, where the run evaluates, its evaluation; counts and time left come from
common/progress.py (a bar on a terminal, a plain line per stage in a log or ``flwr run --stream``). What
each site reported (training loss, ε, test Dice, a refusal or dropout) is a line of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from common.progress import Progress
from contract.run_config import RunConfig
from server.federated_run import EventHook, FederatedRun

LEFT_OUT = ("refused", "rejected", "evaluate-refused", "dropped")
"""Events of a site left out of a step, each with its reason."""


def stages_from(config: RunConfig, first_round: int) -> int:
    """Stages of a run that starts (or resumes) at ``first_round``: preparing the sites, then each round's
    training and evaluation."""
    rounds = range(first_round, config.num_rounds + 1)
    return 1 + sum(1 + int(config.evaluates_after(r)) for r in rounds)


def event_line(event: dict[str, Any]) -> str | None:
    """The line worth keeping of one event (a site's result, a refusal, a round's aggregate), or None."""
    kind = event.get("event")
    where = f"round {event.get('round')}"
    if kind == "train":
        loss = _number(event["metrics"].get("train-loss"))
        spent = f", ε {event['epsilon']:.3f} so far" if "epsilon" in event else ""
        return f"{where}: {event['site']} trained, loss {loss}{spent}"
    if kind in LEFT_OUT:
        return f"{where}: {event['site']} {kind}: {event['reason']}"
    if kind == "aggregate-train":
        if event.get("skipped"):
            return f"{where}: global model unchanged ({event['skipped']})"
        by = f" ({event['aggregated_by']['why']})" if "aggregated_by" in event else ""
        return f"{where}: aggregated{by}, mean site loss {_number(event['metrics'].get('train-loss'))}"
    if kind == "evaluate":
        model = "" if event.get("model", "global") == "global" else f" ({event['model']} model)"
        dice = _number(event["metrics"].get("dice-mean"))
        return f"{where}: {event['site']} ({event['role']}) test Dice {dice}{model}"
    if kind == "report-failed":
        return f"{where}: interim report failed: {event['reason']}"
    return None


def _number(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


class RunProgress:
    """An event hook that advances ``bar`` a step per finished stage and notes each site's results."""

    def __init__(self, config: RunConfig, bar: Progress) -> None:
        self.config = config
        self.bar = bar
        self._stage: str | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "round-start":
            self._start(int(event["round"]), str(event["stage"]))
        elif kind == "finished":
            self._finish_stage()
        elif (line := event_line(event)) is not None:
            self.bar.note(line)

    def _start(self, server_round: int, stage: str) -> None:
        if self.bar.total is None and server_round > 0:
            # The first round is known once it starts (a resumed run starts after its checkpoint).
            self.bar.set_total(stages_from(self.config, server_round))
        self._finish_stage()
        self._stage = f"round {server_round} {stage}" if server_round else stage
        self.bar.working_on(self._stage)

    def _finish_stage(self) -> None:
        if self._stage is not None:
            self.bar.advance(self._stage)
            self._stage = None


@contextmanager
def run_progress(run: FederatedRun, show: bool = True) -> Iterator[None]:
    """Show ``run``'s progress while the block runs (its own event hook, if any, still gets every event)."""
    with Progress("federated run", None, show=show) as bar:
        shown = RunProgress(run.config, bar)
        hook: EventHook | None = run.on_event

        def both(event: dict[str, Any]) -> None:
            shown(event)
            if hook is not None:
                hook(event)

        run.on_event = both
        try:
            yield
        finally:
            run.on_event = hook
