"""What the site has answered in each run: the rounds it trained, the models it evaluated.

The site evaluates only what it has reason to: a training site the global model of a round it trained
in, a holdout site the models the run released, each round once (the same model again is the same
answer and is not counted twice, so a resumed run re-asks freely), at most `SitePolicy.max_evaluations`
per run, and only with a test split of at least `SitePolicy.min_test_subjects` persons. So a coordinator
cannot turn evaluation into per-subject questions (a one-subject test set and a crafted "class k
everywhere" model give that person's structure volume) asked as often as it likes.

One JSON file per run under ``<state-dir>/activity/``, written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.atomic_files import atomic_write_text
from contract.wire import ROLE_TRAIN

ACTIVITY_DIR = "activity"


@dataclass(frozen=True)
class EvaluationRequest:
    """An evaluation the coordinator asks for: of which model, in which round of which run."""

    run_id: str
    server_round: int
    model_digest: str


class SiteActivity:
    """The rounds the site trained and the models it evaluated, per run, in its state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = Path(state_dir) / ACTIVITY_DIR

    def _path(self, run_id: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id) or "run"
        return self.folder / f"{safe}.json"

    def _read(self, run_id: str) -> dict:
        path = self._path(run_id)
        if not path.is_file():
            return {"run_id": run_id, "trained": [], "evaluated": {}}
        return json.loads(path.read_text())

    def _write(self, run_id: str, doc: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path(run_id), json.dumps(doc, indent=1, sort_keys=True))

    def record_trained(self, run_id: str, server_round: int) -> None:
        doc = self._read(run_id)
        if server_round not in doc["trained"]:
            doc["trained"] = sorted([*doc["trained"], server_round])
            self._write(run_id, doc)

    def evaluation_refusal(
        self, request: EvaluationRequest, role: str, test_persons: int, min_test: int, max_evaluations: int
    ) -> str | None:
        """Why the site does not answer ``request`` (see the module docstring), or None."""
        doc = self._read(request.run_id)
        evaluated: dict[str, str] = doc["evaluated"]
        round_key = str(request.server_round)
        if test_persons < min_test:
            return (
                f"the site's test split holds {test_persons} person(s), fewer than its min-test-subjects = "
                f"{min_test}: it reports no test metric (a metric of so few persons describes them)"
            )
        if round_key in evaluated:
            if evaluated[round_key] == request.model_digest:
                return None
            return (
                f"round {request.server_round} was already evaluated with another model; one model per round"
            )
        if role == ROLE_TRAIN and request.server_round not in doc["trained"]:
            return f"the site did not train in round {request.server_round}: it evaluates only rounds it trained in"
        if len(evaluated) >= max_evaluations:
            return f"the site has answered max-evaluations = {max_evaluations} evaluations of this run"
        return None

    def record_evaluated(self, request: EvaluationRequest) -> None:
        doc = self._read(request.run_id)
        doc["evaluated"][str(request.server_round)] = request.model_digest
        self._write(request.run_id, doc)
