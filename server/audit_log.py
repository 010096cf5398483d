"""The coordinator's audit log: who took part in which run and round, and who was refused or dropped.

One JSON object per line in ``<state-dir>/audit.jsonl`` (see server/coordinator_state.py), appended and
flushed to disk at once, never rewritten. Every line has ``time`` (UTC, ISO 8601), ``unix`` (seconds)
and ``event``; the ServerApp's run loop (server/federated_run.py) writes:

- ``run-started``: ``run_id`` (neurofed's run id, also in the sites' privacy ledgers), ``flower_run_id``,
  ``run_dir``, ``resume``, ``first_round``, ``num_rounds``.
- ``site-joined``: ``node_id``, ``site`` (the id the site declares), ``enrolled_as`` (the name it was
  enrolled under with `neurofed coordinator enroll`; null when unknown), ``role``.
- ``round-trained``: ``round``, ``contributed`` (sites whose update was aggregated), ``refused`` (sites
  that declined the round, e.g. their privacy budget, with ``reason``), ``rejected`` (replies the
  server refused: outside the run's reply schema or a norm outlier, with ``reason``), ``dropped``
  (sites that failed or did not answer, with ``reason``) and ``epsilon`` (site -> the run's cumulative
  ε the site reported, at ``delta``).
- ``round-evaluated``: ``round``, ``evaluated``, ``dropped``.
- ``site-rejected``: ``round``, ``stage`` (``discovery``: a node not enrolled, declaring another name than
  its enrolled one, or describing itself unusably; ``enrolment``: revoked during the run), ``site``,
  ``node_id``, ``reason``: the node takes no (further) part in the run.
- ``run-finished`` / ``run-failed`` (with ``reason``).

The coordinator commands add ``site-enrolled`` / ``site-revoked`` (server/site_registry.py).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.json_lines import append_json_line, json_safe, read_json_lines


class AuditLog:
    """Append-only JSON-lines audit log at ``path``."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event (with the current time) and flush it to disk; returns what was written."""
        now = time.time()
        entry = json_safe(
            {
                "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
                "unix": round(now, 3),
                "event": event,
                **fields,
            }
        )
        append_json_line(self.path, entry, mode=0o640)
        return entry

    def read(self) -> list[dict[str, Any]]:
        """Every event so far, in order (a torn last line from a crash is skipped)."""
        return read_json_lines(self.path)
