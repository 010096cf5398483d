"""`neurofed coordinator ...` and `neurofed run`: the coordinator operator's commands.

`study/cli.py` builds the whole `neurofed` command line from these and the researcher's commands; this
module runs alone too (``python -m server.cli``), with the coordinator's commands only.
Each sub-command imports what it needs inside its handler: torch, MONAI and Opacus take seconds to
import, and `neurofed --help` must answer at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.command_line import add_command, command_parser, run_command
from models.errors import NeurofedError


def _add_coordinator(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "coordinator",
        help="run the federation's coordinator (Flower SuperLink) and manage which sites may join",
        description="""
            The coordinator is Flower's SuperLink with TLS and SuperNode authentication on: only sites whose
            public key was enrolled may join. `start` runs it in the foreground (as systemd does); `enroll`,
            `sites` and `revoke` manage the enrolled sites of a running coordinator. Everything it keeps
            (database, run directories, audit log) is in --state-dir.
        """,
    )
    commands = p.add_subparsers(dest="coordinator_command", metavar="ACTION", required=True)

    start = add_command(commands, "start", _run_coordinator_start, defaults_in_help=True)
    _add_state_dir(start)
    start.add_argument(
        "--address",
        default="127.0.0.1:9091",
        help="HOST:PORT to listen on. Flower serves its unauthenticated Control API (enrolment, runs) on the "
        "same port as the sites' Fleet API: keep it on loopback and let sites in through the proxy of "
        "deploy/nginx, which passes only /v1/fleet/ (deploy/README.md)",
    )
    start.add_argument("--ca-cert", type=Path, required=True, help="the federation's CA certificate (PEM)")
    start.add_argument(
        "--cert", type=Path, required=True, help="the coordinator's certificate (PEM), naming its host names"
    )
    start.add_argument("--key", type=Path, required=True, help="the coordinator's private key (PEM)")
    start.add_argument("--telemetry", action="store_true", help="allow Flower's anonymous usage telemetry")

    enroll = add_command(commands, "enroll", _run_coordinator_enroll)
    enroll.add_argument("public_key", type=Path, metavar="SITE_PUBKEY", help="the site's public key file")
    enroll.add_argument("--name", required=True, help="the site's name, e.g. hospital-a")
    _add_state_dir(enroll)

    sites = add_command(commands, "sites", _run_coordinator_sites)
    _add_state_dir(sites)

    revoke = add_command(commands, "revoke", _run_coordinator_revoke)
    revoke.add_argument("name", metavar="NAME", help="the site's enrolled name")
    _add_state_dir(revoke)


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        help="the coordinator's state directory (database, sites.json, audit.jsonl, runs/)",
    )


def _run_coordinator_start(args: argparse.Namespace) -> int:
    """Run the SuperLink in the foreground (TLS, SuperNode authentication, no runtime installs).

    Run Flower's SuperLink as the coordinator: one TLS port for the sites (Fleet API) and for
    `neurofed run` / enrolment (Control API); SuperNode authentication on; runtime installation of
    app dependencies off (the installed neurofed runs, offline); Flower's telemetry off unless
    --telemetry. The TLS files are checked first (present, matching, signed by --ca-cert, in date).
    Stop it with SIGTERM (systemctl stop); its state survives a restart, and an interrupted run
    continues with `neurofed run --resume NAME`.
    """
    from server.coordinator import TlsFiles, start_coordinator

    start_coordinator(
        args.state_dir, TlsFiles(args.ca_cert, args.cert, args.key), args.address, args.telemetry
    )
    return 0  # not reached: the process became the SuperLink


def _run_coordinator_enroll(args: argparse.Namespace) -> int:
    """Allow a site to join: register its SuperNode public key under a name.

    Register a site's SuperNode public key (the site.pub from `neurofed-site keygen`) with the running
    coordinator, under NAME. Only enrolled keys may connect. Recorded in STATE_DIR/sites.json and
    the audit log.
    """
    from server.coordinator_state import CoordinatorState
    from server.site_registry import SiteRegistry

    site = SiteRegistry(CoordinatorState(args.state_dir)).enroll(args.public_key, args.name)
    print(f"enrolled {site.name} (node {site.node_id}); the site can now start with its private key")
    return 0


def _run_coordinator_sites(args: argparse.Namespace) -> int:
    """List enrolled sites, whether their SuperNode is online, and revoked sites.

    List the enrolled sites: name, Flower node id, status (registered: never connected, online,
    offline; revoked, with the time, for a site revoked with `revoke`).
    """
    from server.coordinator_state import CoordinatorState
    from server.site_registry import SiteRegistry

    sites = SiteRegistry(CoordinatorState(args.state_dir)).sites()
    if not sites:
        print("no site is enrolled; enroll one with `neurofed coordinator enroll SITE_PUBKEY --name NAME`")
    for s in sites:
        revoked = f", revoked {s.revoked_at}" if s.revoked_at else ""
        print(f"{s.name:<24} node {s.node_id:<22} {s.status:<16} enrolled {s.enrolled_at}{revoked}")
    return 0


def _run_coordinator_revoke(args: argparse.Namespace) -> int:
    """Stop a site from joining: unregister its SuperNode.

    Unregister the site's SuperNode at the coordinator: it is disconnected and can no longer join
    (to readmit it, enroll a new key). Recorded in the audit log.
    """
    from server.coordinator_state import CoordinatorState
    from server.site_registry import SiteRegistry

    site = SiteRegistry(CoordinatorState(args.state_dir)).revoke(args.name)
    print(f"revoked {site.name} (node {site.node_id}); it can no longer join")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    from contract.resume_settings import RESUMABLE_SETTINGS

    p = add_command(sub, "run", _run_run)
    p.add_argument("config", type=Path, nargs="?", metavar="CONFIG.toml", help="TOML file of run settings")
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run setting (repeatable), e.g. --set num-server-rounds=10 --set strategy=fedprox",
    )
    p.add_argument(
        "--resume",
        metavar="NAME",
        help="continue the interrupted run in STATE_DIR/runs/NAME from its last checkpoint, with its stored "
        f"settings; only --set {', '.join(sorted(RESUMABLE_SETTINGS))} may change them",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="the coordinator's state directory (on the coordinator machine: address and CA from there)",
    )
    p.add_argument(
        "--coordinator", metavar="HOST:PORT", help="the coordinator's address (instead of --state-dir)"
    )
    p.add_argument("--ca", type=Path, help="the federation's CA certificate (with --coordinator)")
    p.add_argument(
        "--app", type=Path, help="the neurofed source folder to submit (default: this installation's)"
    )
    p.add_argument("--no-stream", action="store_true", help="do not print the run's log, only how it ended")


def _run_run(args: argparse.Namespace) -> int:
    """Submit a federated run to the coordinator and follow it until it ends.

    Submit the neurofed Flower app to the coordinator (`flwr run` over TLS) with the run settings of
    pyproject.toml [tool.flwr.app.config], overridden by CONFIG.toml (e.g. deploy/job.toml) and --set
    key=value; stream its log; exit 0 only when the run completed (1 when it failed or was stopped).
    Without num-sites in the job, the run waits for the enrolled sites connected when it is submitted.
    The run directory is written on the coordinator, in STATE_DIR/runs/NAME (NAME: the UTC start time
    unless --set run-dir=runs/NAME); a run that stopped after a checkpoint continues with --resume NAME.
    """
    from contract.resume_settings import RESUMABLE_SETTINGS
    from server.coordinator_state import Connection, CoordinatorState
    from server.job_submission import (
        checkpointed_rounds,
        default_app_dir,
        report_outcome,
        run_settings,
        submit_run,
        wait_for_connected_sites,
    )
    from server.site_registry import SiteRegistry, node_statuses

    state = None
    if args.coordinator or args.ca:
        if not (args.coordinator and args.ca):
            raise NeurofedError("--coordinator and --ca go together (or pass --state-dir on the coordinator)")
        connection = Connection(args.coordinator, args.ca)
    elif args.state_dir:
        state = CoordinatorState(args.state_dir)
        connection = state.read_connection()
    else:
        raise NeurofedError(
            "say where the coordinator is: --state-dir DIR, or --coordinator HOST:PORT --ca CA.crt"
        )
    if args.resume and args.config:
        raise NeurofedError(
            f"--resume {args.resume} continues the run with the settings it was started with: give no "
            f"CONFIG.toml, only --set for {', '.join(sorted(RESUMABLE_SETTINGS))}"
        )
    settings = run_settings(args.config, args.settings, resume=args.resume)
    if "num-sites" not in settings:
        statuses = node_statuses(connection)
        # On the coordinator only enrolled sites count (a node registered by hand never takes part).
        names = SiteRegistry(state).names_by_node_id() if state is not None else {}
        online = [
            names.get(node, f"node {node}")
            for node, status in statuses.items()
            if status == "online" and (state is None or node in names)
        ]
        if (line := wait_for_connected_sites(settings, sorted(online))) is not None:
            print(line, flush=True)
    app_dir = args.app or default_app_dir()
    outcome = submit_run(connection, settings, app_dir, stream=not args.no_stream)
    return report_outcome(outcome, checkpointed_rounds(state, outcome.run_dir))


def add_coordinator_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``coordinator`` (start / enroll / sites / revoke) and ``run`` to a `neurofed` parser."""
    _add_coordinator(sub)
    _add_run(sub)


def build_parser() -> argparse.ArgumentParser:
    return command_parser(
        "neurofed",
        "neurofed coordinator tools: run the federation's coordinator, enroll and revoke sites, submit "
        "federated runs. Run `neurofed COMMAND --help` for the options of a command.",
        [add_coordinator_commands],
    )


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, (NeurofedError,))


if __name__ == "__main__":
    sys.exit(main())
