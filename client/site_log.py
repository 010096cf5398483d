"""What a deployed site tells its own operator: every refusal with its reason, and the final model it keeps.

Both go to the site's log (the SuperNode's output: ``journalctl -u neurofed-site``) and to its audit log,
``<state-dir>/audit.jsonl`` (client/approved_apps.py writes the bundle events there):

- ``round-refused`` / ``evaluation-refused`` / ``run-refused``: ``run_id``, ``round``, ``reason``;
- ``model-received``: the run's final global model, which came with the last round's evaluation message,
  saved as ``<state-dir>/models/<run id>.pt`` (a model file `neurofed-site segment --model` reads), with
  ``model_file`` and ``weights_sha256``, the hash the coordinator's audit log records for the run (``run-finished``).

A simulated site writes neither: its refusals are in the run's metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.approved_apps import AUDIT_LOG_FILE, append_audit_event
from client.site_setup import SiteSetup
from contract.site_task import SiteTask

if TYPE_CHECKING:
    import torch

MODELS_DIR = "models"
"""Final models a site received: ``<state-dir>/models/<run id>.pt``."""
ROUND_REFUSED = "round-refused"
EVALUATION_REFUSED = "evaluation-refused"
RUN_REFUSED = "run-refused"
MODEL_RECEIVED = "model-received"


def _tell(setup: SiteSetup, event: str, line: str, **fields: Any) -> None:
    if setup.simulated:
        return
    print(f"neurofed: {line}", flush=True)
    append_audit_event(setup.state_dir / AUDIT_LOG_FILE, event, **fields)


def log_refusal(setup: SiteSetup, task: SiteTask | None, event: str, reason: str) -> None:
    """Log a refusal of the site (``event``: `ROUND_REFUSED`, `EVALUATION_REFUSED` or `RUN_REFUSED`)."""
    run_id = task.run_id if task is not None else ""
    server_round = task.server_round if task is not None else 0
    what = {ROUND_REFUSED: "training", EVALUATION_REFUSED: "evaluation", RUN_REFUSED: "the run"}[event]
    _tell(
        setup,
        event,
        f"REFUSED {what} (run {run_id or '?'}, round {server_round}): {reason}",
        run_id=run_id,
        round=server_round,
        reason=reason,
    )


def final_model_path(setup: SiteSetup, run_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id) or "run"
    return setup.state_dir / MODELS_DIR / f"{safe}.pt"


def keep_final_model(
    setup: SiteSetup, task: SiteTask, model: torch.nn.Module, plan: dict[str, Any]
) -> Path | None:
    """Save the run's final global model in the site's state folder and log its hash (deployed sites only)."""
    from models.label_protocols import get_protocol
    from models.model_file import save_model, weights_sha256

    if setup.simulated or task.server_round != task.run.num_rounds:
        return None
    path = final_model_path(setup, task.run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    save_model(
        path,
        state,
        network=task.run.network_config(),
        protocol=get_protocol(task.run.protocol),
        plan=plan,
        training={
            "kind": "federated",
            "run_id": task.run_id,
            "rounds": task.run.num_rounds,
            "strategy": task.run.strategy,
            "dp": task.run.dp,
            "received_by": setup.site_id,
        },
        postprocessing=task.run.postprocessing,
    )
    digest = weights_sha256(state)
    _tell(
        setup,
        MODEL_RECEIVED,
        f"received the final model of run {task.run_id} (weights sha256 {digest}), saved as {path}; "
        f"use it with `neurofed-site segment --model {path} ...`",
        run_id=task.run_id,
        round=task.server_round,
        weights_sha256=digest,
        model_file=str(path),
    )
    return path
