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

from contract.resume_settings import RESUME_SETTINGS_KEY, decode_resume_settings, encode_resume_settings
from contract.run_config import RunConfig, flower_key
from models.errors import NeurofedError
from server.coordinator_state import Connection, CoordinatorState
from server.flower_control import CONNECTION_NAME, FlowerControl

STATUS_ATTEMPTS = 5
"""Reads of a run's status in a row that may fail (a coordinator too busy to answer) before `neurofed run`
gives up following the run (the run itself goes on)."""
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
    known = {flower_key(f.name) for f in fields(RunConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise NeurofedError(f"unknown run settings {unknown}; known: {sorted(known)}")
    # Catch a bad value here rather than minutes later in the coordinator's log. A resume's few settings
    # are checked with the stored ones by the coordinator; here no default (one unseen site) may refuse them.
    RunConfig.from_flower({"unseen-sites": 0, **settings} if resume is not None else settings)
    if resume is not None:
        # A resumed run keeps its stored settings but for the few that may change (RESUMABLE_SETTINGS).
        return {
            "resume": True,
            "run-dir": resume if "/" in resume else f"{RUNS_FOLDER}/{resume}",
            RESUME_SETTINGS_KEY: encode_resume_settings(settings),
        }
    if "run-dir" not in settings or settings["run-dir"] == RunConfig().run_dir:
        settings["run-dir"] = f"{RUNS_FOLDER}/{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}"
    return settings


def wait_for_connected_sites(settings: dict[str, Any], online: Sequence[str]) -> str | None:
    """Without ``num-sites`` in a run's settings (a new run's, or a resume's changes): wait for the
    ``online`` enrolled sites, so that a run, or a run resumed after a site was revoked or went away, does
    not wait ``round-timeout-s`` for sites that are not there.

    Returns the line that says so (None when the job sets num-sites itself); NeurofedError when no site is
    online.
    """
    resume = bool(settings.get("resume"))
    changes = decode_resume_settings(str(settings.get(RESUME_SETTINGS_KEY, ""))) if resume else settings
    if "num-sites" in changes:
        return None
    if not online:
        raise NeurofedError(
            "no enrolled site is connected, so the run would have no site to wait for: start the sites "
            "(`neurofed coordinator sites` shows who is online), or set num-sites in the job"
        )
    if resume:
        settings[RESUME_SETTINGS_KEY] = encode_resume_settings({**changes, "num-sites": len(online)})
    else:
        settings["num-sites"] = len(online)
        settings.setdefault("unseen-sites", 0)  # a deployed site declares its role itself
        RunConfig.from_flower(settings)
    what = "the resumed run" if resume else "the run"
    return (
        f"num-sites = {len(online)}: {what} waits for the sites connected now ({', '.join(online)}); "
        "set num-sites (--set num-sites=N) to wait for more"
    )


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
    poll_s: float = 15.0,
) -> RunOutcome:
    """Submit the app with ``settings``, stream its log until it ends, return its final status.

    Flower's log stream ends with the run; its status is read then, and every ``poll_s`` seconds in case
    the stream broke off (each read is a `flwr` process: not in a tight loop on a small machine).
    """
    with FlowerControl(connection) as control, tempfile.TemporaryDirectory(prefix="neurofed-run-") as tmp:
        config_path = _write_settings(settings, Path(tmp))
        answer = control.call_json(
            ["run", str(app_dir), CONNECTION_NAME, "--run-config", str(config_path)], "submitting the run"
        )
        run_id = int(answer["run-id"])
        print(f"submitted run {run_id} (run directory {settings['run-dir']} on the coordinator)", flush=True)
        quiet = None if stream else subprocess.DEVNULL
        log = subprocess.Popen(
            control.command("log", str(run_id), CONNECTION_NAME, "--stream"),
            env=control.environment,
            stdout=quiet,
            stderr=quiet,
        )
        failures = 0
        try:
            while True:
                try:
                    log.wait(timeout=poll_s)
                except subprocess.TimeoutExpired:
                    pass
                try:
                    status, details = _run_status(control, run_id)
                    failures = 0
                except NeurofedError as exc:
                    # The run goes on at the coordinator whatever happens here: a busy coordinator is asked again.
                    failures += 1
                    if failures >= STATUS_ATTEMPTS:
                        raise
                    print(f"neurofed run: {exc}; asking again", file=sys.stderr, flush=True)
                    continue
                if status.startswith("finished"):
                    break
                if log.poll() is not None:
                    time.sleep(min(poll_s, 3.0))
        finally:
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


def checkpointed_rounds(state: CoordinatorState | None, run_dir: str) -> list[int] | None:
    """The rounds of the run with a checkpoint on the coordinator; None when it cannot be seen from here."""
    if state is None:
        return None
    from server.run_directory import RunDirectory

    try:
        return RunDirectory(state.resolve_run_dir(run_dir)).completed_rounds()
    except OSError:
        return None


def report_outcome(outcome: RunOutcome, checkpoints: list[int] | None = None) -> int:
    """Print how the run ended; 0 when it completed, 1 otherwise.

    Args:
        checkpoints: the run's checkpointed rounds (None: unknown here); a resume is suggested only for a
            run with a checkpoint.
    """
    if outcome.succeeded:
        print(f"run {outcome.flower_run_id} completed; run directory {outcome.run_dir} on the coordinator")
        return 0
    name = Path(outcome.run_dir).name
    if checkpoints:
        then = (
            f"continue it from its checkpoint of round {checkpoints[-1]} with `neurofed run --resume {name}`"
        )
    elif checkpoints is None:
        then = f"if it wrote a checkpoint (runs/{name}/checkpoints/), continue it with `neurofed run --resume {name}`"
    else:
        then = "submit it again: it stopped before its first checkpoint, so there is nothing to resume"
    print(
        f"run {outcome.flower_run_id} ended {outcome.status}"
        + (f": {outcome.details}" if outcome.details else "")
        + f". See the log above and the coordinator's audit log; after fixing the cause, {then}",
        file=sys.stderr,
    )
    return 1
