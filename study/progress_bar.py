"""A rich progress bar over a known number of steps, with fields of its own, shown only when enabled.

Serves the study evaluation (study/study_evaluation.py: training steps, scored and audited subjects) and
centralised training (study/local_training.py: steps, last loss, validation Dice). ``rich`` is imported
only when the bar is shown, so importing this module costs nothing.
"""

from __future__ import annotations

from typing import Any


class ProgressBar:
    """One rich task of ``total`` steps, described as ``description``, its ``fields`` shown by ``template``.

    ``enabled`` None: only on a terminal. Disabled, every method does nothing.
    """

    def __init__(
        self, enabled: bool | None, total: int, description: str, template: str, **fields: Any
    ) -> None:
        if enabled is None:
            from rich.console import Console

            enabled = Console().is_terminal
        self._enabled = enabled
        self._total = total
        self._description = description
        self._template = template
        self._fields = fields

    def __enter__(self) -> ProgressBar:
        if self._enabled:
            from rich.progress import Progress

            self._bar = Progress(*Progress.get_default_columns(), self._template)
            self._bar.__enter__()
            self._task = self._bar.add_task(self._description, total=self._total, **self._fields)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._enabled:
            self._bar.__exit__(*exc)

    def advance(self, **fields: Any) -> None:
        """One step done; ``fields`` replace the shown ones."""
        if self._enabled:
            self._bar.update(self._task, advance=1, **fields)

    def update(self, **fields: Any) -> None:
        """Replace shown fields without a step."""
        if self._enabled:
            self._bar.update(self._task, **fields)

    @property
    def completed(self) -> int:
        """Steps done so far (0 when disabled)."""
        return int(self._bar.tasks[0].completed) if self._enabled else 0

    def print(self, text: str) -> None:
        """A line above the bar."""
        if self._enabled:
            self._bar.console.print(text)
