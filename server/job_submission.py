"""`neurofed run`: submit a federated job to the coordinator, stream its log, report how it ended.

The job is this project's Flower app (pyproject.toml ``[tool.flwr.app]``), submitted with Flower's
``flwr run`` to the coordinator's Control API over TLS; its settings are the app's run config
(``[tool.flwr.app.config]``) overridden by a TOML file of run settings and ``--set key=value`` pairs.
``flwr run --stream`` exits 0 even when the run fails, so after the log ends the run's final status is
read back (``flwr ls``) and decides the exit code.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from contract.run_config import RunConfig, flower_key
from models.errors import NeurofedError
from server.coordinator_state import Connection
from server.flower_control import CONNECTION_NAME, FlowerControl

RUNS_FOLDER = "runs"
"""Run directories of a deployment go to ``<coordinator state-dir>/runs/<name>``."""


@dataclass(frozen=True)
class RunOutcome:
    """How a submitted run ended.

    Attributes:
        flower_run_id: Flower's id of the run (``flwr ls``, ``flwr log``).
        status: Flower's final status, e.g. ``finished:completed``, ``finished:failed``.
        details: Flower's status details (the error of a failed run), may be empty.
        run_dir: the run directory as the coordinator resolves it (relative: inside its state directory).
    """

    flower_run_id: int
    status: str
    details: str
    run_dir: str

    @property
    def succeeded(self) -> bool:
        return self.status == "finished:completed"


def parse_setting(assignment: str) -> tuple[str, Any]:
    """``key=value`` -> (key, TOML value); a value that is not TOML (``fedprox``) is a string."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise NeurofedError(f"--set {assignment!r}: expected key=value, e.g. --set num-server-rounds=10")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key, value


def run_settings(
    config_file: Path | None,
    assignments: Sequence[str],
    resume: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The run-config overrides of one submission, checked against `RunConfig`.

    Args:
        config_file: TOML file of run settings (flat ``key = value``, as in ``[tool.flwr.app.config]``).
        assignments: ``key=value`` overrides, applied after the file.
        resume: name (or path) of an interrupted run directory to continue; sets ``resume`` and ``run-dir``.
        now: the time naming a new run directory (``runs/YYYYMMDD-HHMMSS``) when none is given.
    """
    settings: dict[str, Any] = {}
    if config_file is not None:
        try:
            document = tomllib.loads(config_file.read_text())
        except FileNotFoundError:
            raise NeurofedError(f"CONFIG {config_file}: file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise NeurofedError(f"CONFIG {config_file}: not valid TOML ({exc})") from exc
        table = document.get("tool", {}).get("flwr", {}).get("app", {}).get("config", document)
        settings.update(table)
    settings.update(parse_setting(a) for a in assignments)
    known = {flower_key(f.name) for f in fields(RunConfig)} | {"resume", "resume-rounds"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise NeurofedError(f"unknown run settings {unknown}; known: {sorted(known)}")
    if resume is not None:
        settings["resume"] = True
        settings["run-dir"] = resume if "/" in resume else f"{RUNS_FOLDER}/{resume}"
        # A resumed run keeps its stored settings; asking for more rounds extends it (server/federated_run.py).
        settings["resume-rounds"] = int(settings.pop("num-server-rounds", 0))
    elif "run-dir" not in settings or settings["run-dir"] == RunConfig().run_dir:
        settings["run-dir"] = f"{RUNS_FOLDER}/{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}"
    # Catch a bad value here rather than minutes later in the coordinator's log.
    RunConfig.from_flower({k: v for k, v in settings.items() if k not in ("resume", "resume-rounds")})
    return settings


def default_app_dir() -> Path:
    """The neurofed project folder (its pyproject.toml declares the Flower app)."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise NeurofedError(
            f"no Flower app beside this neurofed installation ({pyproject} missing); pass --app with the "
            "neurofed source folder"
        )
    return root


def _write_settings(settings: Mapping[str, Any], folder: Path) -> Path:
    import tomli_w

    path = folder / "run-config.toml"
    path.write_text(tomli_w.dumps(dict(settings)))
    return path


def submit_run(
    connection: Connection,
    settings: Mapping[str, Any],
    app_dir: Path,
    stream: bool = True,
    poll_s: float = 3.0,
) -> RunOutcome:
    """Submit the app with ``settings``, stream its log until it ends, return its final status."""
    with FlowerControl(connection) as control, tempfile.TemporaryDirectory(prefix="neurofed-run-") as tmp:
        config_path = _write_settings(settings, Path(tmp))
        answer = control.call_json(
            ["run", str(app_dir), CONNECTION_NAME, "--run-config", str(config_path)], "submitting the run"
        )
        run_id = int(answer["run-id"])
        print(f"submitted run {run_id} (run directory {settings['run-dir']} on the coordinator)", flush=True)
        log = None
        if stream:
            log = subprocess.Popen(
                control.command("log", str(run_id), CONNECTION_NAME, "--stream"), env=control.environment
            )
        try:
            while True:
                status, details = _run_status(control, run_id)
                if status.startswith("finished"):
                    break
                time.sleep(poll_s)
        finally:
            if log is not None:
                try:
                    log.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    log.terminate()
                    log.wait(timeout=10)
    return RunOutcome(run_id, status, details, str(settings["run-dir"]))


def _run_status(control: FlowerControl, run_id: int) -> tuple[str, str]:
    answer = control.call_json(
        ["ls", CONNECTION_NAME, "--run-id", str(run_id)], f"reading the status of run {run_id}"
    )
    (run,) = [r for r in answer.get("runs", []) if int(r["run-id"]) == run_id]
    details = str(run.get("status-details", ""))
    return str(run["status"]), "" if details == "N/A" else details


def report_outcome(outcome: RunOutcome) -> int:
    """Print how the run ended; 0 when it completed, 1 otherwise."""
    if outcome.succeeded:
        print(f"run {outcome.flower_run_id} completed; run directory {outcome.run_dir} on the coordinator")
        return 0
    name = Path(outcome.run_dir).name
    print(
        f"run {outcome.flower_run_id} ended {outcome.status}"
        + (f": {outcome.details}" if outcome.details else "")
        + f". See the log above and the coordinator's audit log; after fixing the cause, continue it from its "
        f"last checkpoint with `neurofed run --resume {name}`",
        file=sys.stderr,
    )
    return 1
