"""The deployment on Flower's deployment engine, with real processes on loopback.

A real coordinator (`neurofed coordinator start`: SuperLink, TLS, SuperNode authentication) and three real
sites (`neurofed-site start`: SuperNodes) run a 2-round job submitted with `neurofed run`. After round 1's
checkpoint the coordinator is stopped and started again, and `neurofed run --resume` finishes the run from
that checkpoint. Sites whose key was never enrolled, or was revoked, are refused and say why. Certificates
come from deploy/make-certs.sh; every process a test starts is stopped by its fixture (the whole process
tree). A site dropped in the middle of a run (revoked), two runs in a row and an upgrade are rehearsed by
deploy/rehearse.sh (tests/test_rehearsal.py).

The sites run only the app bundle approved with `neurofed-site approve`: the fixture freezes the app as
`neurofed run` submits it (this checkout's bundle, unpacked, so that edits made meanwhile change nothing),
approves that bundle's file, and submits it with `--app`. The same bundle with one byte changed is refused
by every site before any of its code runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from flwr.serverapp import Grid

from bench.bench_deployment import free_port
from bench.process_tree import stop_process_tree
from bench.tiny_sites import write_tiny_site
from client.approved_apps import ACCEPTED_EVENT, AUDIT_LOG_FILE, REFUSED_EVENT, read_audit_events
from client.site_keys import check_private_key, generate_site_keys
from client.site_setup import LEDGER_FILE
from contract.wire import TRAIN_LOSS_KEY
from models.errors import NeurofedError
from models.model_file import weights_sha256
from server.audit_log import AuditLog
from server.coordinator_state import CoordinatorState
from server.global_model import read_model_state
from server.job_submission import run_settings
from server.run_directory import RunDirectory
from server.site_registry import SiteRegistry

ROOT = Path(__file__).resolve().parents[1]
MAKE_CERTS = ROOT / "deploy" / "make-certs.sh"
RUN_NAME = "study"
SITES = ("site-1", "site-2", "site-3")
JOB = [
    "num-server-rounds=2",
    "local-steps=2",
    "patch-size=16",
    "batch-size=1",
    "num-sites=3",
    "unseen-sites=0",
    "min-sites=2",
    "spacing-mm=4.0",
    "field-of-view-mm='64,64,64'",
    "network-preset='tiny'",
    "initial-model='none'",
    "test-fraction=0.34",
    "eval-every=2",
    "round-timeout-s=400.0",
    "dp=true",
    f"run-dir='runs/{RUN_NAME}'",
]


def job_with(**changes: str) -> list[str]:
    """JOB with some settings changed (keys with ``_`` for ``-``)."""
    changed = {k.replace("_", "-"): v for k, v in changes.items()}
    return [s for s in JOB if s.split("=")[0] not in changed] + [f"{k}={v}" for k, v in changed.items()]


def as_options(job: list[str]) -> list[str]:
    """A job's settings as `neurofed run` options."""
    return [a for s in job for a in ("--set", s)]


SITE_BUDGET = "50"
"""Every site's lifetime ε."""
WAIT_S = 420.0
"""Upper bound for one step of the job on two loaded cores (each Flower message starts a fresh process)."""


# --- processes -----------------------------------------------------------------------------------------


class Daemon:
    """A command run in its own session, its output in a log file; `stop` ends it and every descendant
    (Flower starts helper processes in sessions of their own)."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self._out = log.open("ab")
        self.process = subprocess.Popen(
            command, stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 20.0) -> None:
        stop_process_tree(self.process, sig, grace_s)
        self._out.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_for(condition, what: str, timeout_s: float = WAIT_S, every_s: float = 0.5, logs=()):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- the federation ------------------------------------------------------------------------------------


def _freeze_app(folder: Path) -> tuple[Path, Path]:
    """(app folder, its bundle file): the bundle `neurofed run` makes of this checkout, unpacked into
    ``folder/neurofed``, and the bundle Flower builds from that folder (the same bytes: `flwr build` is
    reproducible, tests/test_approved_apps.py)."""
    from flwr.cli.build import build_fab_from_disk

    app = folder / "neurofed"
    zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).extractall(app)
    bundle = folder / "neurofed.fab"
    bundle.write_bytes(build_fab_from_disk(app))
    return app, bundle


def _make_certs(folder: Path) -> tuple[Path, Path, Path]:
    """CA and coordinator certificate for loopback, made by the deployment kit's script."""
    if not MAKE_CERTS.is_file():
        pytest.skip(f"{MAKE_CERTS} is missing")
    subprocess.run(["bash", str(MAKE_CERTS), str(folder)], check=True, capture_output=True, timeout=120)
    return folder / "ca.crt", folder / "server.crt", folder / "server.key"


class Federation:
    """A coordinator on a free loopback port and the site daemons started against it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.state = CoordinatorState(root / "coordinator")
        self.ca, self.cert, self.key = _make_certs(root / "certs")
        self.env = {
            **os.environ,
            "FLWR_HOME": str(root / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
        self.coordinator: Daemon | None = None
        self.sites: dict[str, Daemon] = {}
        self.daemons: list[Daemon] = []
        self.logs = root / "logs"
        self.logs.mkdir()
        self.app, bundle = _freeze_app(root / "app")
        self.approved_hash = hashlib.sha256(bundle.read_bytes()).hexdigest()
        self.approved_apps = root / "approved-apps.txt"
        approve = self.cli("client.cli", "approve", str(bundle), "--approved-apps", str(self.approved_apps))
        subprocess.run(approve, check=True, env=self.env, cwd=ROOT, timeout=120, capture_output=True)

    def cli(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    def start_coordinator(self) -> None:
        command = self.cli(
            "server.cli",
            "coordinator",
            "start",
            "--state-dir",
            str(self.state.root),
            "--address",
            f"127.0.0.1:{self.port}",
            "--ca-cert",
            str(self.ca),
            "--cert",
            str(self.cert),
            "--key",
            str(self.key),
        )
        self.coordinator = Daemon(command, self.logs / "coordinator.log", self.env)
        self.daemons.append(self.coordinator)
        _wait_for(lambda: _port_open(self.port), "the coordinator's port", 120, logs=[self.coordinator.log])

    def start_site(self, name: str, key: Path, data: Path) -> Daemon:
        command = self.cli(
            "client.cli",
            "start",
            "--coordinator",
            f"127.0.0.1:{self.port}",
            "--ca",
            str(self.ca),
            "--key",
            str(key),
            "--data",
            str(data),
            "--budget",
            SITE_BUDGET,
            "--state-dir",
            str(self.site_state(name)),
            "--site-id",
            name,
            "--runtime-port",
            str(free_port()),
            "--approved-apps",
            str(self.approved_apps),
            # The study runs with DP; the comparison with the in-process run needs a job without.
            "--allow-no-dp",
        )
        # Each site keeps Flower's files in its own state folder, as deployed (apps it installed: flwr-home/apps).
        env = {k: v for k, v in self.env.items() if k != "FLWR_HOME"}
        daemon = Daemon(command, self.logs / f"{name}.log", env)
        self.sites[name] = daemon
        self.daemons.append(daemon)
        return daemon

    def run(self, *args: str, app: Path | None = None) -> list[str]:
        """`neurofed run` of the frozen app (or of ``app``)."""
        return self.cli(
            "server.cli", "run", "--state-dir", str(self.state.root), "--app", str(app or self.app), *args
        )

    def site_state(self, name: str) -> Path:
        return self.root / "site-state" / name

    def init_ledgers(self, names: list[str]) -> None:
        """The sites' one-time setup by their operators: the privacy ledger with the lifetime budget."""
        setups = []
        for name in names:
            ledger = self.site_state(name) / LEDGER_FILE
            budget = ["--set-budget", SITE_BUDGET, "--delta", "1e-5"]
            init = self.cli("client.cli", "budget", "--init", "--ledger", str(ledger), *budget)
            setups.append(subprocess.Popen(init, env=self.env, cwd=ROOT))
        assert [p.wait(timeout=120) for p in setups] == [0] * len(names)

    def start_missing_sites(self) -> None:
        """(Re)start every site of SITES whose daemon is not running."""
        for name in SITES:
            daemon = self.sites.get(name)
            if daemon is None or daemon.process.poll() is not None:
                self.start_site(name, self.keys[name].private_key, self.root / "data" / name)

    def stop_all(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop(signal.SIGKILL, grace_s=5)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A running coordinator with three enrolled sites' keys (sites not started yet)."""
    root = tmp_path_factory.mktemp("deployment")
    fed = Federation(root)
    try:
        fed.start_coordinator()
        fed.keys = {name: generate_site_keys(root / "keys" / name) for name in SITES}
        # One enrolment through the command line, the others through the same library call.
        subprocess.run(
            fed.cli(
                "server.cli",
                "coordinator",
                "enroll",
                str(fed.keys[SITES[0]].public_key),
                "--name",
                SITES[0],
                "--state-dir",
                str(fed.state.root),
            ),
            check=True,
            env=fed.env,
            cwd=ROOT,
            timeout=120,
        )
        registry = SiteRegistry(fed.state)
        for name in SITES[1:]:
            registry.enroll(fed.keys[name].public_key, name)
        for i, name in enumerate(SITES):
            write_tiny_site(root / "data" / name, 3, gain=1.0 + 0.3 * i, seed=i)
        fed.init_ledgers(list(SITES))
        yield fed
    finally:
        fed.stop_all()


@pytest.fixture(scope="module")
def interrupted_study(federation):
    """The 2-round job: the coordinator restarted after round 1, then the run resumed."""
    fed = federation
    for name in SITES:
        fed.start_site(name, fed.keys[name].private_key, fed.root / "data" / name)
    run_dir = RunDirectory(fed.state.runs_dir / RUN_NAME)
    first = Daemon(fed.run(*as_options(JOB)), fed.logs / "run-1.log", fed.env)
    fed.daemons.append(first)
    logs = [first.log, fed.coordinator.log, *(d.log for d in fed.sites.values())]
    _wait_for(lambda: 1 in run_dir.completed_rounds(), "round 1's checkpoint", logs=logs)

    # The coordinator goes down between rounds (as `systemctl restart` would do it) ...
    fed.coordinator.stop(signal.SIGTERM)
    first_exit = first.process.wait(timeout=300)
    first.stop()
    # ... and comes back with its state; the sites reconnect by themselves.
    fed.start_coordinator()
    resumed = subprocess.run(
        fed.run("--resume", RUN_NAME, "--set", "min-sites=2"),
        env=fed.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=2 * WAIT_S,
    )
    return {
        "run_dir": run_dir,
        "first_exit": first_exit,
        "resumed": resumed,
        "audit": AuditLog(fed.state.audit_path).read(),
    }


# --- tests -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sites_never_enrolled_or_revoked_are_refused(federation) -> None:
    fed = federation
    stranger = generate_site_keys(fed.root / "keys" / "stranger")
    revoked = generate_site_keys(fed.root / "keys" / "revoked")
    registry = SiteRegistry(fed.state)
    revoked_id = registry.enroll(revoked.public_key, "revoked-site").node_id
    assert "revoked-site" in {s.name for s in registry.sites()}
    registry.revoke("revoked-site")
    data = fed.root / "data" / SITES[0]
    attempts = {
        "stranger": fed.start_site("stranger", stranger.private_key, data),
        "revoked-site": fed.start_site("revoked-site", revoked.private_key, data),
    }
    for name, daemon in attempts.items():
        code = daemon.process.wait(timeout=WAIT_S)
        assert code != 0, f"{name} was let in:\n{daemon.text()[-2000:]}"
        # The site says in its own words what was refused and what to check, naming its key.
        text = daemon.text()
        assert "refused this site's key (SHA256:" in text and "not enrolled" in text, text[-2000:]
    listed = {s.name: s.status for s in registry.sites()}
    assert "stranger" not in listed and listed["revoked-site"] == "revoked"
    events = [(e["event"], e.get("site")) for e in AuditLog(fed.state.audit_path).read()]
    assert ("site-enrolled", "revoked-site") in events and ("site-revoked", "revoked-site") in events
    # A revoked key is never admitted again; the hospital comes back with a new key, under its name.
    with pytest.raises(NeurofedError, match="was revoked .* new key pair"):
        registry.enroll(revoked.public_key, "revoked-again")
    readmitted = registry.enroll(generate_site_keys(fed.root / "keys" / "readmitted").public_key, "revoked-site")
    assert {s.name: s.status for s in registry.sites()}["revoked-site"] == "registered"
    assert "revoked-site" in registry.revocation(revoked_id) and registry.revocation(readmitted.node_id) is None


@pytest.mark.slow
def test_run_survives_a_killed_site_and_a_coordinator_restart(interrupted_study) -> None:
    resumed = interrupted_study["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # The first submission saw its coordinator go away: it must not report success.
    assert interrupted_study["first_exit"] != 0
    run_dir = interrupted_study["run_dir"]
    events = run_dir.read_events()
    aggregated = [e["round"] for e in events if e["event"] == "aggregate-train"]
    assert aggregated == [1, 2]  # round 1 once (not redone after the restart), then round 2
    assert run_dir.final_model_path.is_file()
    assert (run_dir.root / "report.md").is_file() and (run_dir.root / "report.html").is_file()

    trained = {r: {e["site"] for e in events if e["event"] == "train" and e["round"] == r} for r in (1, 2)}
    assert trained[1] == trained[2] == set(SITES)  # the sites reconnected to the restarted coordinator
    assert not [e for e in events if e["event"] == "dropped"]


@pytest.mark.slow
def test_audit_log_names_sites_rounds_contributions_dropouts_and_epsilon(interrupted_study) -> None:
    audit = interrupted_study["audit"]
    assert all("time" in e and "event" in e for e in audit)
    starts = [e for e in audit if e["event"] == "run-started"]
    assert [(e["resume"], e["first_round"], e["num_rounds"]) for e in starts] == [(False, 1, 2), (True, 2, 2)]
    assert starts[0]["run_id"] == starts[1]["run_id"]  # the sites' ledgers see one run
    joined = [e for e in audit if e["event"] == "site-joined"]
    assert {e["site"] for e in joined} == set(SITES)
    # Flower's 64-bit ids are strings: jq and other JSON readers round large numbers.
    assert all(e["enrolled_as"] == e["site"] and e["node_id"].isdigit() for e in joined)
    assert all(e["flower_run_id"].isdigit() for e in starts)
    rounds = {e["round"]: e for e in audit if e["event"] == "round-trained"}
    assert sorted(rounds) == [1, 2]
    assert sorted(rounds[1]["contributed"]) == sorted(rounds[2]["contributed"]) == sorted(SITES)
    assert rounds[1]["dropped"] == rounds[2]["dropped"] == []
    for server_round, entry in rounds.items():
        assert set(entry["epsilon"]) == set(entry["contributed"]), server_round
        assert all(0 < v["epsilon"] < 50 for v in entry["epsilon"].values())
    # ε accumulates over the run: round 2 spends on top of round 1.
    for site in set(rounds[1]["contributed"]):
        assert rounds[2]["epsilon"][site]["epsilon"] > rounds[1]["epsilon"][site]["epsilon"]
    assert audit[-1]["event"] == "run-finished"
    assert audit[-1]["weights_sha256"] == weights_sha256(read_model_state(interrupted_study["run_dir"].final_model_path))


@pytest.mark.slow
def test_sites_ran_only_the_approved_bundle(federation, interrupted_study) -> None:
    fed = federation
    for name in SITES:
        events = read_audit_events(fed.site_state(name) / AUDIT_LOG_FILE)
        accepted = {e["fab_hash"] for e in events if e["event"] == ACCEPTED_EVENT}
        assert accepted == {fed.approved_hash}, f"{name}: {events}"
        installed = [p.name for p in (fed.site_state(name) / "flwr-home" / "apps").iterdir()]
        assert installed and all(p.endswith(fed.approved_hash[:8]) for p in installed), installed


TAMPERED_JOB = job_with(num_server_rounds="1", run_dir="'runs/tampered'")


@pytest.mark.slow
def test_a_bundle_changed_after_approval_never_runs_at_any_site(federation) -> None:
    from flwr.cli.build import build_fab_from_disk

    fed = federation
    fed.start_missing_sites()
    tampered = fed.root / "tampered" / "neurofed"
    shutil.copytree(fed.app, tampered)
    client_app = tampered / "client" / "app.py"
    client_app.write_bytes(client_app.read_bytes() + b"#")  # one byte more in the ClientApp's code
    tampered_hash = hashlib.sha256(build_fab_from_disk(tampered)).hexdigest()
    assert tampered_hash != fed.approved_hash
    done = subprocess.run(
        fed.run(*as_options(TAMPERED_JOB), "--no-stream", app=tampered),
        env=fed.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    # The run stopped at site discovery, before any round: no site trained, and the coordinator was told why.
    events = RunDirectory(fed.state.runs_dir / "tampered").read_events()
    assert not [e for e in events if e["event"] == "train"]
    failed = [
        e
        for e in AuditLog(fed.state.audit_path).read()
        if e["event"] == "run-failed" and e.get("run_dir") == str(fed.state.runs_dir / "tampered")
    ]
    assert len(failed) == 1 and f"app bundle {tampered_hash} is not approved" in failed[0]["reason"]
    for name in SITES:
        daemon = fed.sites[name]
        assert daemon.process.poll() is None, f"{name} stopped:\n{daemon.text()[-2000:]}"
        log = daemon.text()
        assert "REFUSED run" in log and tampered_hash in log and fed.approved_hash in log, log[-2000:]
        refused = [
            e
            for e in read_audit_events(fed.site_state(name) / AUDIT_LOG_FILE)
            if e["event"] == REFUSED_EVENT and e["fab_hash"] == tampered_hash
        ]
        assert refused and refused[0]["approved"] == [fed.approved_hash], name
        assert refused[0]["time"].endswith("+00:00")
        apps = fed.site_state(name) / "flwr-home" / "apps"
        installed = [p.name for p in apps.iterdir()] if apps.is_dir() else []
        assert not [p for p in installed if p.endswith(tampered_hash[:8])], (
            f"{name} installed it: {installed}"
        )


EQUAL_JOB = job_with(num_server_rounds="1", dp="false", seed="3", eval_every="1", run_dir="'runs/equal'")


@pytest.mark.slow
def test_a_job_through_warm_workers_gives_the_model_of_the_same_job_run_in_process(
    federation, interrupted_study, tmp_path, task_identity
) -> None:
    """Deployment changes where the site handlers run, not what they compute: the same job (DP off, same
    seed) run by the deployed sites' workers and run with the same sites' handlers in this process."""
    from bench.in_process_grid import InProcessGrid
    from client.site_daemon import SiteDaemonConfig, node_config_values
    from models.networks import build_network
    from server.federated_run import FederatedRun

    fed = federation
    fed.start_missing_sites()
    done = subprocess.run(
        fed.run(*as_options(EQUAL_JOB), "--no-stream"), env=fed.env, cwd=ROOT, capture_output=True, text=True,
        timeout=WAIT_S,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    deployed = RunDirectory(fed.state.runs_dir / "equal")
    for name in SITES:
        assert "train of run" in fed.sites[name].text(), f"{name}'s worker did not train"

    # The same three sites in this process: their node config without a worker, on copies of their state
    # (the split's secret, the ledger, the preprocessed cache).
    node_configs = []
    for name in SITES:
        state = tmp_path / "site-state" / name
        shutil.copytree(fed.site_state(name), state, ignore=shutil.ignore_patterns("worker", "flwr-home"))
        site = SiteDaemonConfig(
            data_dir=fed.root / "data" / name, budget_epsilon=float(SITE_BUDGET), state_dir=state, site_id=name,
            allow_no_dp=True, worker="off",
        )
        node_configs.append(node_config_values(site))
    in_process = RunDirectory(tmp_path / "in-process")
    in_process.root.mkdir()
    config = deployed.read_config().replace(run_dir=str(in_process.root))
    FederatedRun(config, InProcessGrid(len(SITES), node_configs=node_configs)).execute()

    expected, got = read_model_state(in_process.final_model_path), read_model_state(deployed.final_model_path)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-6, err_msg=key)
    # Training moved the weights: the comparison is not of two untouched starting networks.
    initial = build_network(config.network_config(), seed=config.seed).state_dict()
    assert any(not np.allclose(got[k], initial[k].numpy()) for k in got)

    # Each site trained on the same patches: the same loss and update size (the sites' test splits are too
    # small for their policy to report an evaluation).
    def trained(run: RunDirectory) -> dict[str, tuple[float, float]]:
        events = [e for e in run.read_events() if e["event"] == "train"]
        return {e["site"]: (e["metrics"][TRAIN_LOSS_KEY], e["update_norm"]) for e in events}

    deployed_sites, in_process_sites = trained(deployed), trained(in_process)
    assert set(deployed_sites) == set(in_process_sites) == set(SITES)
    for site in SITES:
        assert deployed_sites[site] == pytest.approx(in_process_sites[site], rel=1e-4), site


KILLED_WORKER_JOB = job_with(local_steps="30", run_dir="'runs/worker-killed'")
KILLED_SITE = SITES[2]


@pytest.mark.slow
def test_a_worker_killed_mid_round_is_restarted_and_its_site_drops_out_of_that_round_only(
    federation, interrupted_study
) -> None:
    fed = federation
    fed.start_missing_sites()
    site = fed.sites[KILLED_SITE]
    before = len(site.text())
    job = Daemon(fed.run(*as_options(KILLED_WORKER_JOB), "--no-stream"), fed.logs / "run-killed.log", fed.env)
    fed.daemons.append(job)
    logs = [job.log, site.log, fed.coordinator.log]
    _wait_for(lambda: "train of run" in site.text()[before:], f"{KILLED_SITE}'s worker to train", every_s=0.1, logs=logs)
    killed = int(re.findall(r"site worker (\d+) is ready", site.text())[-1])
    os.kill(killed, signal.SIGKILL)
    assert job.process.wait(timeout=2 * WAIT_S) == 0, job.text()[-3000:]

    restarted = [int(p) for p in re.findall(r"site worker (\d+) is ready", site.text()[before:])]
    assert restarted and killed not in restarted, site.text()[-3000:]
    events = RunDirectory(fed.state.runs_dir / "worker-killed").read_events()
    trained = {r: {e["site"] for e in events if e["event"] == "train" and e["round"] == r} for r in (1, 2)}
    dropped = [e for e in events if e["event"] == "dropped"]
    # The killed site's round-1 update is lost (the others carry the round), and it is back for round 2.
    assert trained[1] == set(SITES) - {KILLED_SITE}, events
    assert [(e["site"], e["round"]) for e in dropped] == [(KILLED_SITE, 1)]
    assert "site worker" in dropped[0]["reason"] and "stopped while handling" in dropped[0]["reason"]
    assert trained[2] == set(SITES)


# --- fast checks of the commands' inputs ----------------------------------------------------------------


def test_keygen_writes_an_owner_only_private_key_and_never_overwrites(tmp_path) -> None:
    pair = generate_site_keys(tmp_path / "keys")
    assert pair.private_key.stat().st_mode & 0o777 == 0o600
    assert pair.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    check_private_key(pair.private_key)
    before = pair.private_key.read_bytes()
    with pytest.raises(NeurofedError, match="already exists"):
        generate_site_keys(tmp_path / "keys")
    assert pair.private_key.read_bytes() == before
    pair.private_key.chmod(0o644)
    with pytest.raises(NeurofedError, match="chmod 600"):
        check_private_key(pair.private_key)


def test_site_start_refuses_unusable_data_and_names_the_problem(tmp_path) -> None:
    pair = generate_site_keys(tmp_path / "keys")
    data = tmp_path / "data"
    anat = data / "sub-01" / "anat"
    anat.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), anat / "sub-01_T1w.nii.gz")
    ca = tmp_path / "ca.crt"
    ca.write_text("not used: the data check comes first\n")
    done = subprocess.run(
        [sys.executable, "-m", "client.cli", "start", "--coordinator", "127.0.0.1:1", "--ca", str(ca)]
        + ["--key", str(pair.private_key), "--data", str(data), "--budget", "5"]
        + ["--state-dir", str(tmp_path / "state"), "--runtime-port", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 2
    assert f"--data {data}" in done.stderr and "no usable subject" in done.stderr
    assert "sub-01" in done.stdout  # the check's table names the subject and why it cannot be used
    assert not (tmp_path / "state").exists()


def test_coordinator_start_names_a_missing_or_mismatched_certificate_file(tmp_path) -> None:
    ca, cert, key = _make_certs(tmp_path / "certs")
    other_ca, _, other_key = _make_certs(tmp_path / "other")

    def start(*files: Path) -> subprocess.CompletedProcess:
        args = ["--ca-cert", str(files[0]), "--cert", str(files[1]), "--key", str(files[2])]
        return subprocess.run(
            [sys.executable, "-m", "server.cli", "coordinator", "start", "--state-dir", str(tmp_path / "s")]
            + ["--address", "127.0.0.1:1"]
            + args,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )

    missing = start(ca, tmp_path / "nope.crt", key)
    assert missing.returncode == 2 and f"--cert {tmp_path / 'nope.crt'}: file not found" in missing.stderr
    wrong_key = start(ca, cert, other_key)
    assert (
        wrong_key.returncode == 2
        and "--key" in wrong_key.stderr
        and "not the private key" in wrong_key.stderr
    )
    wrong_ca = start(other_ca, cert, key)
    assert wrong_ca.returncode == 2 and "--ca-cert" in wrong_ca.stderr and "issued by" in wrong_ca.stderr
    assert not (tmp_path / "s").exists()


def test_run_settings_merge_file_and_overrides_and_reject_unknown_keys(tmp_path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('strategy = "fedprox"\nnum-server-rounds = 3\n')
    settings = run_settings(job, ["num-server-rounds=7", "contrast=T2w"])
    assert settings["strategy"] == "fedprox" and settings["num-server-rounds"] == 7
    assert settings["contrast"] == "T2w"
    assert settings["run-dir"].startswith("runs/") and "resume" not in settings
    resumed = run_settings(None, [], resume="study")
    assert resumed == {"resume": True, "run-dir": "runs/study", "resume-settings": ""}  # all as stored
    changed = run_settings(None, ["num-server-rounds=9", "num-sites=2", "min-sites=1"], resume="study")
    assert json.loads(changed["resume-settings"]) == {"num-server-rounds": 9, "num-sites": 2, "min-sites": 1}
    with pytest.raises(NeurofedError, match=r"\['strategy'\] cannot be changed"):
        run_settings(None, ["strategy=fedprox"], resume="study")
    with pytest.raises(NeurofedError, match="num-rounds"):
        run_settings(None, ["num-rounds=3"])
    with pytest.raises(NeurofedError, match="min-sites"):
        run_settings(None, ["min-sites=-1"])


def test_a_relative_run_dir_lies_in_the_coordinator_state_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NEUROFED_COORDINATOR_STATE_DIR", str(tmp_path))
    state = CoordinatorState.from_environment()
    assert state is not None and state.resolve_run_dir("runs/a") == tmp_path / "runs" / "a"
    assert state.resolve_run_dir(str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"
    with pytest.raises(NeurofedError, match="--state-dir"):
        SiteRegistry(state).sites()
    assert (
        json.loads(json.dumps(AuditLog(tmp_path / "audit.jsonl").record("x", value=float("nan"))))["value"]
        is None
    )


def test_a_failed_or_stopped_run_exits_non_zero_and_says_how_to_continue(capsys) -> None:
    from server.job_submission import RunOutcome, report_outcome

    assert report_outcome(RunOutcome(7, "finished:completed", "", "runs/a")) == 0
    for status in ("finished:failed", "finished:stopped"):
        outcome = RunOutcome(7, status, "round 2 training: 1 of 3 site(s) replied", "runs/a")
        assert report_outcome(outcome, checkpoints=[1]) == 1
        err = capsys.readouterr().err
        assert status in err and "1 of 3 site(s) replied" in err and "round 1 with `neurofed run --resume a`" in err
    # A run that never reached a checkpoint is not offered a resume; unknown from here: said as such.
    report_outcome(RunOutcome(7, "finished:failed", "site discovery failed", "runs/a"), checkpoints=[])
    err = capsys.readouterr().err
    assert "--resume" not in err and "nothing to resume" in err
    report_outcome(RunOutcome(7, "finished:failed", "", "runs/a"), checkpoints=None)
    assert "if it wrote a checkpoint" in capsys.readouterr().err


def test_a_new_run_without_num_sites_waits_for_the_connected_sites() -> None:
    from server.job_submission import wait_for_connected_sites

    settings = run_settings(None, [])
    line = wait_for_connected_sites(settings, ["hospital-a", "hospital-c"])
    assert settings["num-sites"] == 2 and settings["unseen-sites"] == 0
    assert "hospital-a, hospital-c" in line and "num-sites" in line
    given = run_settings(None, ["num-sites=5"])
    assert wait_for_connected_sites(given, []) is None and given["num-sites"] == 5
    with pytest.raises(NeurofedError, match="no enrolled site is connected"):
        wait_for_connected_sites(run_settings(None, []), [])


def test_a_resume_after_a_site_left_waits_for_the_sites_connected_now() -> None:
    from contract.resume_settings import RESUME_SETTINGS_KEY, decode_resume_settings
    from server.job_submission import wait_for_connected_sites

    # A run of three sites, one of them revoked since: the resume waits for the two still there ...
    resumed = run_settings(None, ["min-sites=1"], resume="20261206-120000")
    line = wait_for_connected_sites(resumed, ["hospital-a", "hospital-b"])
    assert decode_resume_settings(resumed[RESUME_SETTINGS_KEY]) == {"min-sites": 1, "num-sites": 2}
    assert "resumed run" in line and "hospital-a, hospital-b" in line
    # ... and num-sites may be set on resume whatever the app's default number of unseen sites.
    given = run_settings(None, ["num-sites=1"], resume="20261206-120000")
    assert wait_for_connected_sites(given, []) is None
    assert decode_resume_settings(given[RESUME_SETTINGS_KEY]) == {"num-sites": 1}


class _FlakyGrid:
    """Answers each message with a reply, an error reply (``failing`` nodes), nothing (``silent`` nodes),
    or, for a node revoked before the message (``revoked``), the SuperLink's error reply to no message."""

    def __init__(self, failing: set[int], silent: set[int], revoked: frozenset[int] = frozenset()) -> None:
        self.failing, self.silent, self.revoked = failing, silent, revoked

    def send_and_receive(self, messages, timeout):
        from flwr.app import Message, MetricRecord, RecordDict
        from flwr.app.error import Error

        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # what the real Grid does when it sends
            if m.metadata.dst_node_id in self.revoked:
                # The SuperLink never stored it: its "not found" answers an empty message id, from itself.
                lost = Message(Error(code=3, reason="Message Unavailable - SuperNode was removed"), reply_to=m)
                lost.metadata.__dict__["_reply_to_message_id"] = ""
                lost.metadata.__dict__["_src_node_id"] = 1
                replies.append(lost)
                continue
            if m.metadata.dst_node_id in self.silent:
                continue
            if m.metadata.dst_node_id in self.failing:
                error = Message(Error(code=0, reason="disk full"), reply_to=m)
                # As the SuperLink's own error replies for a lost node: sent by the SuperLink (node 1).
                error.metadata.__dict__["_src_node_id"] = 1
                replies.append(error)
            else:
                replies.append(Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=m))
        return replies


def test_dropped_sites_are_logged_while_min_sites_replied_and_stop_the_run_below(
    tmp_path, task_identity
) -> None:
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from contract.run_config import RunConfig
    from server.federated_run import FederatedRun
    from server.site_discovery import Site

    sites = [
        Site(node_id=10 + n, site_id=f"site-{n}", role="train", num_train=2, num_test=1) for n in (1, 2, 3, 4)
    ]

    def send(required: int, revoked: frozenset[int] = frozenset()) -> tuple[list, list]:
        config = RunConfig(num_sites=4, unseen_sites=0, min_sites=required, run_dir=str(tmp_path / "run"))
        grid = _FlakyGrid(failing={12}, silent={14} - revoked, revoked=revoked)
        run = FederatedRun(config, grid, known_cause=lambda node: "revoked at T" if node in revoked else None)
        run.sites = sites
        messages = [
            Message(
                RecordDict({"config": ConfigRecord({"r": 1})}),
                dst_node_id=s.node_id,
                message_type=MessageType.TRAIN,
            )
            for s in sites
        ]
        return run._send(messages, "training", 3, required=required)

    good, dropped = send(required=2)
    assert [r.metadata.src_node_id for r in good] == [11, 13]
    assert [d["site"] for d in dropped] == ["site-2", "site-4"]
    events = [e for e in RunDirectory(tmp_path / "run").read_events() if e["event"] == "dropped"]
    assert [(e["round"], e["site"], e["stage"]) for e in events] == [
        (3, "site-2", "training"),
        (3, "site-4", "training"),
    ]
    assert "disk full" in events[0]["reason"] and "round-timeout-s" in events[1]["reason"]

    with pytest.raises(
        NeurofedError, match=r"2 of 4 site\(s\) replied, 3 needed.*site-2: .*disk full.*site-4.*start the run again"
    ):
        send(required=3)
    # A site revoked meanwhile: the SuperLink's answer names why, for that site (not for "node 1").
    _, dropped = send(required=2, revoked=frozenset({14}))
    assert [d["site"] for d in dropped] == ["site-2", "site-4"]
    assert dropped[1]["reason"].startswith("revoked at T (the coordinator could not deliver")
    assert "removed" in dropped[1]["reason"]


def test_a_round_in_which_no_site_contributed_stops_the_run_naming_each_site(tmp_path, task_identity) -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from contract.run_config import RunConfig
    from server.federated_run import FederatedRun
    from server.site_discovery import Site
    from server.strategies import training_schemas

    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})

    run = FederatedRun(RunConfig(num_sites=2, unseen_sites=0, run_dir=str(tmp_path / "run")), grid=None)
    run.sites = [Site(node_id=11, site_id="site-1", role="train", num_train=2, num_test=1)]
    asked = Message(RecordDict(), dst_node_id=11, message_type=MessageType.TRAIN)
    asked.metadata.__dict__["_message_id"] = asked.object_id
    refusal = RecordDict(
        {
            "metrics": MetricRecord({"refused": 1, "num-examples": 0, "epsilon": 2.0, "delta": 1e-5}),
            "refusal": ConfigRecord({"reason": "privacy budget: spent"}),
        }
    )
    reply = Message(refusal, reply_to=asked)
    reply.metadata.__dict__["_src_node_id"] = 11
    with pytest.raises(NeurofedError, match=r"round 3: no site's update could be used \(site-1 refused: privacy budget: spent; site-2 dropped: gone\).*start the run again"):
        run._screen_updates(3, [reply], arrays, training_schemas(run.config, arrays), [{"site": "site-2", "reason": "gone"}])


class _SlowSiteGrid(Grid):
    """A Flower Grid whose sites reply ``ready_after`` pulls after the push (``None``: never)."""

    def __init__(self, ready_after: dict[int, int | None]) -> None:
        self.ready_after, self.pulls, self.sent = ready_after, 0, {}

    run = None  # type: ignore[assignment]

    def set_run(self, run_id: int) -> None:  # pragma: no cover - not used
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover - not used
        raise NotImplementedError

    def get_node_ids(self):  # pragma: no cover - not used
        return list(self.ready_after)

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - must not be used
        raise AssertionError("send_and_wait polls through push_messages / pull_messages")

    def push_messages(self, messages):
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.sent[m.metadata.message_id] = m
        return list(self.sent)

    def pull_messages(self, message_ids):
        from flwr.app import Message, MetricRecord, RecordDict

        self.pulls += 1
        ready = []
        for mid in message_ids:
            after = self.ready_after[self.sent[mid].metadata.dst_node_id]
            if after is not None and self.pulls > after:
                ready.append(Message(RecordDict({"m": MetricRecord({"ok": 1})}), reply_to=self.sent[mid]))
        return ready


def test_replies_are_collected_every_fraction_of_a_second_and_a_silent_site_times_out(
    monkeypatch, task_identity
) -> None:
    """Flower's deployment grid checks for replies every 3 s; the run checks every REPLY_POLL_S, returns as
    soon as every site answered, and gives up on a silent one at the timeout."""
    from flwr.app import Message, RecordDict

    from server import site_replies

    slept: list[float] = []
    monkeypatch.setattr(site_replies.time, "sleep", slept.append)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in (1, 2)]
    grid = _SlowSiteGrid({1: 0, 2: 2})
    replies = site_replies.send_and_wait(grid, messages, timeout_s=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(grid.sent)
    assert grid.pulls == 3 and slept == [site_replies.REPLY_POLL_S] * 2

    clock = iter(range(0, 1000, 10))  # every check for replies takes 10 s
    monkeypatch.setattr(site_replies.time, "monotonic", lambda: next(clock))
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in (1, 2)]
    replies = site_replies.send_and_wait(_SlowSiteGrid({1: 0, 2: None}), messages, timeout_s=25)
    assert [r.metadata.reply_to_message_id for r in replies] == [messages[0].metadata.message_id]


def test_flower_processes_check_for_new_tasks_every_tenth_of_a_second() -> None:
    from client.site_daemon import supernode_environment
    from common.flower_environment import SUPEREXEC_TASK_POLL_S
    from server.flower_control import flower_environment

    for env in (supernode_environment(), flower_environment()):
        assert float(env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]) == SUPEREXEC_TASK_POLL_S
        assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
