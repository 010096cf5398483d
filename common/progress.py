"""The progress of a long phase: a bar with counts and time left on a terminal, one line per step elsewhere.

Every phase of neurofed that can take more than a few seconds reports through `Progress`: synthesis,
preparing a site's subjects, the federated rounds, the baselines, the cross-site evaluation, the
membership audit, segmenting a folder. On a terminal it draws a rich bar (title, bar, done/total,
elapsed, time left, what it is doing); written to a file or a pipe (a CI log, ``flwr run --stream``,
which relays the ServerApp's output), where a bar cannot redraw, it prints one plain line per step::

    cross-site evaluation: 3/12 federated on site-02 sub-003 (0:07 elapsed, about 0:21 left)

``rich``, the one library outside the standard library that this floor uses, is imported only when a
bar is drawn, so the plain lines and importing this module cost nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

SHORT_STEPS_LINES = 20
"""Plain lines of a phase of many short steps, such as optimizer steps: a line every 5 %, not every step."""


def format_duration(seconds: float) -> str:
    """``M:SS`` (or ``H:MM:SS`` from an hour on) of a number of seconds."""
    minutes, secs = divmod(int(round(max(seconds, 0.0))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (where a bar can redraw itself)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """One phase of ``total`` steps; use as a context manager, call `advance` after each step.

    Args:
        title: what the phase is, e.g. ``"cross-site evaluation"``.
        total: its number of steps; None while not yet known (`set_total`).
        show: False: nothing is shown or printed.
        stream: where to write; default ``sys.stdout`` at the time the phase starts (so a caller's
            redirection applies). A bar when it is a terminal, plain lines otherwise.
        lines: for a phase of many short steps (optimizer steps), at most about this many plain lines,
            evenly spaced, the last step always; default one a step. A bar shows every step.
    """

    def __init__(
        self,
        title: str,
        total: int | None,
        *,
        show: bool = True,
        stream: TextIO | None = None,
        lines: int | None = None,
    ) -> None:
        self.title = title
        self.total = total
        self.done = 0
        self._show = show
        self._stream = stream
        self._lines = lines
        self._bar: Any = None
        self._what_width = 0
        self._plain = False
        self._started = time.monotonic()

    def __enter__(self) -> Progress:
        self._started = time.monotonic()
        if not self._show:
            return self
        stream = self._stream or sys.stdout
        if not is_terminal(stream):
            self._plain = True
            self._stream = stream
            return self
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        console = Console(file=stream)
        # What the step does gets the room the counts and times leave, so those are never squeezed.
        self._what_width = max(12, console.width - len(self.title) - 62)
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("elapsed,"),
            TimeRemainingColumn(),
            TextColumn("left"),
            TextColumn("{task.fields[what]}"),
            console=console,
        )
        self._bar.__enter__()
        self._task = self._bar.add_task(self.title, total=self.total, what="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None

    def set_total(self, total: int) -> None:
        """The number of steps, once known."""
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def working_on(self, what: str) -> None:
        """Show what the current step does (on the bar; plain lines name a step when it is done)."""
        if self._bar is not None:
            self._bar.update(self._task, what=self._fit(what))

    def advance(self, what: str = "", steps: int = 1) -> None:
        """``steps`` more steps done; ``what`` says which (shown beside the counts)."""
        before, self.done = self.done, self.done + steps
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, what=self._fit(what))
        elif self._plain and self._line_due(before):
            self._write(self.status_line(what))

    def note(self, text: str) -> None:
        """A line of its own (above the bar on a terminal): a result worth keeping in the log."""
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False)
        elif self._plain:
            self._write(text)

    def status_line(self, what: str = "") -> str:
        """``title: done/total what (elapsed, time left)``, the plain line of the current step."""
        elapsed = time.monotonic() - self._started
        counts = f"{self.done}/{self.total if self.total is not None else '?'}"
        line = f"{self.title}: {counts}" + (f" {what}" if what else "")
        if self.total is not None and self.done >= self.total:
            return f"{line} (done in {format_duration(elapsed)})"
        if self.total is not None and self.done > 0:
            left = elapsed / self.done * (self.total - self.done)
            return f"{line} ({format_duration(elapsed)} elapsed, about {format_duration(left)} left)"
        return f"{line} ({format_duration(elapsed)} elapsed)"

    def _fit(self, what: str) -> str:
        return what if len(what) <= self._what_width else what[: self._what_width - 1] + "…"

    def _line_due(self, before: int) -> bool:
        if self._lines is None or not self.total or self.done >= self.total:
            return True
        return self.done * self._lines // self.total > before * self._lines // self.total

    def _write(self, line: str) -> None:
        assert self._stream is not None
        self._stream.write(line + "\n")
        self._stream.flush()
