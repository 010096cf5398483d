"""The coordinator's Flower ServerApp: runs the federated rounds and writes the run directory.

``app`` is the coordinator's run alone; it reads every setting from Flower's run config. The Flower
app that ``flwr run .`` loads (pyproject's ``serverapp = "study.flower_app:app"``) runs `run_federation`
as it is when deployed, and in a simulation on one machine adds the study around it (its data, the full
report), which needs the sites' data and so lives in study/. ``make_server_app`` builds the coordinator's
app with settings given in code (``neurofed simulate`` passes its options this way, since Flower's
in-process simulation hands the app an empty run config) and with hooks for tests and benchmarks.

One run:

1. Send every site a ``query`` message: each answers its site id, its role (``train`` or ``holdout``,
   a site that never trains) and its number of training / test subjects. Sites prepare (and cache)
   their data on this first message.
2. Each round: training sites get the global arrays and train locally; the strategy aggregates their
   replies (in site-id order, so a run is reproducible to the bit); every ``eval-every`` rounds and
   after the last one every site, holdout sites included, evaluates the global model on its test split.
   Each site's reply is logged with its site id to ``metrics.jsonl``; the global model and strategy
   state are checkpointed.
3. A resumed run (``resume = true``) continues after the last complete checkpoint of ``run-dir`` with
   the settings stored there, so it ends with the weights an uninterrupted run would have; only the
   settings in ``resume-settings`` (rounds, sites, min-sites, round timeout) may change.

A site that fails or does not answer within ``round-timeout-s`` is dropped from that round (a ``dropped``
event with the site, round and reason) as long as ``min-sites`` training sites replied; otherwise the run
stops with an error that names the sites. A site that fails site discovery, or whose installed neurofed
speaks another contract version (contract/version.py), takes no part in the run. A round in which no
site's update could be used stops the run with the reason of each site.

Deployed (the coordinator's SuperLink sets ``NEUROFED_COORDINATOR_STATE_DIR``, server/coordinator_state.py),
a relative ``run-dir`` lies in the coordinator's state directory, every run, site, round, contribution,
refusal, dropout and reported ε goes to its audit log (server/audit_log.py), and the run's report is
written when it finishes.

Messages to and from sites carry only the model arrays, run settings (ConfigRecord) and aggregate
metrics (MetricRecord of scalars); their names are contract/wire.py's, the settings contract/site_task.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from contract.resume_settings import RESUME_SETTINGS_KEY, decode_resume_settings
from contract.run_config import RunConfig
from server.audit_log import AuditLog
from server.coordinator_state import CoordinatorState
from server.federated_run import EventHook, FederatedRun, MessageHook
from server.run_directory import RunDirectory
from server.run_progress import run_progress
from server.site_registry import SiteRegistry

RESUME_KEY = "resume"
"""Flower run-config key (bool): continue the run in ``run-dir`` instead of starting a new one."""


def run_settings(flower_config: Mapping[str, Any]) -> tuple[RunConfig, bool]:
    """The run's settings and whether to resume, from Flower's flat run config (``resume`` and
    ``resume-settings`` included).

    A resumed run's settings are the interrupted run's, stored in its run directory, but for those
    ``resume-settings`` changes (contract/resume_settings.py, `RESUMABLE_SETTINGS`).
    """
    settings = dict(flower_config)
    resume = bool(settings.pop(RESUME_KEY, False))
    changes = decode_resume_settings(str(settings.pop(RESUME_SETTINGS_KEY, "")))
    config = RunConfig.from_flower(settings)
    if resume:
        deployment = CoordinatorState.from_environment()
        run_dir = deployment.resolve_run_dir(config.run_dir) if deployment is not None else config.run_dir
        stored = RunDirectory(run_dir).read_config().to_flower()
        config = RunConfig.from_flower({**stored, **changes, "run-dir": config.run_dir})
    return config, resume


def run_federation(
    grid: Grid,
    context: Context,
    config: RunConfig,
    resume: bool,
    *,
    on_event: EventHook | None = None,
    on_message: MessageHook | None = None,
    progress: bool = True,
) -> Path:
    """Run (or resume) the federation over ``grid``; returns its run directory.

    Deployed, the run directory lies in the coordinator's state directory, the audit log gets every step
    and the run's report is written at the end; see `make_server_app` for the arguments.
    """
    deployment = CoordinatorState.from_environment()
    if deployment is None:
        run = FederatedRun(config, grid, resume=resume, on_event=on_event, on_message=on_message)
        with run_progress(run, show=progress):
            run.execute()
        return Path(run.config.run_dir)
    config = config.replace(run_dir=str(deployment.resolve_run_dir(config.run_dir)))
    run = FederatedRun(
        config,
        grid,
        resume=resume,
        on_event=on_event,
        on_message=on_message,
        audit=AuditLog(deployment.audit_path),
        enrolment=SiteRegistry(deployment).names_by_node_id,
        flower_run_id=context.run_id,
        known_cause=SiteRegistry(deployment).revocation,
    )
    try:
        with run_progress(run, show=progress):
            run.execute()
    except BaseException as exc:
        run.audit_event("run-failed", run_dir=config.run_dir, reason=str(exc) or type(exc).__name__)
        raise
    try:
        write_deployed_report(Path(config.run_dir))
    except Exception as exc:  # the run itself completed: its files are all there
        run.audit_event("report-failed", run_dir=config.run_dir, reason=f"{type(exc).__name__}: {exc}")
        print(f"neurofed: the run finished but its report failed ({exc}); see the audit log (report-failed)")
    return Path(config.run_dir)


def make_server_app(
    run_config: Mapping[str, Any] | None = None,
    *,
    on_event: EventHook | None = None,
    on_message: MessageHook | None = None,
    progress: bool = True,
) -> ServerApp:
    """A ServerApp whose settings are Flower's run config overridden by ``run_config`` (flat keys).

    Args:
        run_config: flat Flower keys (``num-server-rounds``, ``strategy``, ..., and ``resume``) that
            override the run config Flower passes in.
        on_event: receives every metrics event (and progress events) as it happens.
        on_message: receives every message to and from the sites (for audits and tests).
        progress: show the run's progress, a step per stage (server/run_progress.py): a bar on a
            terminal, a line per stage in a log (``flwr run --stream`` relays the ServerApp's output).
    """
    server_app = ServerApp()
    overrides = dict(run_config or {})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config, resume = run_settings({**dict(context.run_config), **overrides})
        run_federation(
            grid, context, config, resume, on_event=on_event, on_message=on_message, progress=progress
        )

    return server_app


def write_deployed_report(run_dir: Path) -> None:
    """The report of a finished deployed run (from its metrics; the cross-site study evaluation needs the
    sites' data, which never reaches the coordinator)."""
    from server.report import write_report

    write_report(run_dir)


app = make_server_app()
