"""Faults with real processes: a malicious site, a site revoked while online, a coordinator SIGKILLed.

One federation on loopback (tests/test_deployment.py's `Federation`: a coordinator with TLS and SuperNode
authentication, sites as real SuperNodes, `neurofed run` submissions), its sites dialling through the
Fleet proxy of deploy/nginx when nginx is installed. Honest sites and a malicious one (``site-m``,
started with bench/faulty_site on its PYTHONPATH: its ClientApp answers each training message with the
next malformed reply of a list, bench/faulty_site/malformed_replies.py, and every evaluation with a Dice
of 7) run one job, a `Scenario`, during which the coordinator is SIGKILLed while it writes a checkpoint
(its strategy state written, its model file half-way) and/or while the sites train, restarted, and the
run resumed with `neurofed run --resume`; and ``site-m`` is revoked while its SuperNode is online.

The suite runs `QUICK` (one honest site; one kill, in round 1's checkpoint; site-m revoked before
round 2): every round is aggregated exactly once, each malformed reply is a ``rejected`` event, the
revoked site gets no further message, and the killed round's reservation still counts in the honest
site's privacy ledger.
bench/bench_faults.py runs a longer scenario (both kill points, every malformed reply of
malformed_replies.py, malformed evaluations) with the same code.
"""

from __future__ import annotations

import http.client
import re
import shutil
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_deployment import ROOT, WAIT_S, Daemon, Federation, _port_open, _wait_for

from bench.bench_deployment import free_port
from bench.faulty_site.malformed_replies import KINDS
from bench.tiny_sites import write_tiny_site
from client.site_keys import generate_site_keys
from client.site_setup import LEDGER_FILE
from privacy.privacy_ledger import PrivacyLedger
from server.audit_log import AuditLog
from server.run_directory import RunDirectory
from server.site_registry import SiteRegistry

FAULTY_SITE = ROOT / "bench" / "faulty_site"
FLEET_CONF = ROOT / "deploy" / "nginx" / "neurofed-fleet.conf"
MALICIOUS = "site-m"
RUN_NAME = "faults"


@dataclass(frozen=True)
class Scenario:
    """One job of the faulty federation.

    Attributes:
        honest: the honest sites (the malicious one is `MALICIOUS`).
        rounds: the job's rounds.
        sent: the malicious site's training replies, in the order it gets training messages.
        kill_in_checkpoint: the round whose checkpoint write the coordinator is SIGKILLed in (0: none).
        kill_mid_round: the round in which it is SIGKILLed while the sites train (0: none; after the other).
        revoke_before: the first round without the malicious site (revoked once the round before ended).
        eval_every: the job's ``eval-every``.
    """

    honest: tuple[str, ...]
    rounds: int
    sent: tuple[str, ...]
    kill_in_checkpoint: int
    kill_mid_round: int
    revoke_before: int
    eval_every: int

    def job(self) -> list[str]:
        return [
            f"num-server-rounds={self.rounds}",
            "local-steps=1",
            "patch-size=16",
            "batch-size=1",
            f"num-sites={len(self.honest) + 1}",
            "unseen-sites=0",
            f"min-sites={len(self.honest)}",
            "spacing-mm=4.0",
            "field-of-view-mm='64,64,64'",
            "network-preset='tiny'",
            "initial-model='none'",  # the shipped starting model is the default network's, at 2 mm
            "test-fraction=0.34",
            f"eval-every={self.eval_every}",
            "round-timeout-s=400.0",
            "dp=true",
            f"run-dir='runs/{RUN_NAME}'",
        ]


QUICK = Scenario(
    honest=("site-a",),
    rounds=2,
    sent=("float64 values of 1e200", "a text array"),
    kill_in_checkpoint=1,
    kill_mid_round=0,
    revoke_before=2,
    eval_every=2,
)


class FaultyFederation(Federation):
    """`Federation` with fault injection, and its sites behind the Fleet proxy when nginx is installed."""

    def __init__(self, root: Path, sent: tuple[str, ...]) -> None:
        super().__init__(root)
        self.faults = root / "faults"
        self.faults.mkdir()
        self.sent = sent
        self.coordinator_port = self.port
        self.site_port = self.port
        self.nginx: Daemon | None = None

    def _with(self, extra: dict[str, str], start, *args):
        """``start(*args)`` with ``extra`` in the environment `Federation` gives the daemon it starts."""
        saved = self.env
        self.env = {**saved, **extra}
        try:
            return start(*args)
        finally:
            self.env = saved

    def start_coordinator(self) -> None:
        self.port = self.coordinator_port
        fault = {"PYTHONPATH": str(FAULTY_SITE), "NEUROFED_FAULT": f"checkpoint:{self.faults}"}
        self._with(fault, super().start_coordinator)

    def start_site(self, name: str, key: Path, data: Path) -> Daemon:
        fault = {
            "PYTHONPATH": str(FAULTY_SITE),
            "NEUROFED_FAULT": f"site:{self.faults}:{','.join(self.sent)}",
        }
        self.port = self.site_port  # `Federation` points its sites at self.port
        try:
            return self._with(fault if name == MALICIOUS else {}, super().start_site, name, key, data)
        finally:
            self.port = self.coordinator_port

    def start_proxy(self) -> None:
        """nginx with deploy/nginx/neurofed-fleet.conf in front of the coordinator; sites dial it."""
        nginx = shutil.which("nginx")
        if nginx is None:
            return
        self.site_port = free_port()
        conf = (
            FLEET_CONF.read_text()
            .replace("listen 9092 ssl;", f"listen 127.0.0.1:{self.site_port} ssl;")
            .replace("/etc/neurofed/certs/", f"{self.ca.parent}/")
            .replace("127.0.0.1:9091", f"127.0.0.1:{self.coordinator_port}")
        )
        prefix = self.root / "nginx"
        prefix.mkdir()
        (prefix / "neurofed-fleet.conf").write_text(conf)
        temp = "".join(f"{kind}_temp_path {prefix}/{kind};\n" for kind in ("client_body", "proxy"))
        (prefix / "nginx.conf").write_text(
            "daemon off;\nworker_processes 1;\n"
            f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\nevents {{}}\n"
            f"http {{\naccess_log {prefix}/access.log;\n{temp}"
            f"include {prefix}/neurofed-fleet.conf;\n}}\n"
        )
        command = [
            nginx,
            "-p",
            str(prefix),
            "-e",
            str(prefix / "error.log"),
            "-c",
            str(prefix / "nginx.conf"),
        ]
        self.nginx = Daemon(command, self.logs / "nginx.log", self.env)
        self.daemons.append(self.nginx)
        _wait_for(lambda: _port_open(self.site_port), "nginx's port", 60, logs=[self.nginx.log])

    def ledger(self, name: str) -> PrivacyLedger:
        return PrivacyLedger(self.site_state(name) / LEDGER_FILE)

    def reservations(self, name: str, server_round: int) -> int:
        ledger = self.ledger(name)
        return [r.server_round for r in ledger.releases()].count(server_round) if ledger.path.is_file() else 0


def start_faulty_federation(root: Path, scenario: Scenario) -> FaultyFederation:
    """Proxy, coordinator, the sites enrolled, with their data and ledgers, started (all stopped again if
    one of these steps fails)."""
    fed = FaultyFederation(root, scenario.sent)
    sites = (*scenario.honest, MALICIOUS)
    try:
        fed.start_proxy()
        fed.start_coordinator()
        fed.keys = {name: generate_site_keys(root / "keys" / name) for name in sites}
        registry = SiteRegistry(fed.state)
        for i, name in enumerate(sites):
            registry.enroll(fed.keys[name].public_key, name)
            write_tiny_site(root / "data" / name, 3, gain=1.0 + 0.3 * i, seed=i)
        fed.init_ledgers(list(sites))
        for name in sites:
            fed.start_site(name, fed.keys[name].private_key, root / "data" / name)
    except BaseException:
        fed.stop_all()
        raise
    return fed


def run_scenario(fed: FaultyFederation, scenario: Scenario) -> dict:
    """Run ``scenario``'s job to its end through its kills, restarts and the revocation; what happened."""
    logs = lambda: [d.log for d in fed.daemons]  # noqa: E731
    submissions: list[Daemon] = []

    def submit(*args: str) -> Daemon:
        daemon = Daemon(fed.run(*args), fed.logs / f"run-{len(submissions) + 1}.log", fed.env)
        fed.daemons.append(daemon)
        submissions.append(daemon)
        return daemon

    def pause(server_round: int) -> tuple[Path, Path]:
        control = (
            fed.faults / f"pause-round-{server_round:03d}",
            fed.faults / f"paused-round-{server_round:03d}",
        )
        control[0].touch()
        return control

    def kill_and_restart() -> None:
        fed.coordinator.stop(signal.SIGKILL, grace_s=5)  # the SuperLink and the ServerApp it started
        fed.start_coordinator()

    job = [a for s in scenario.job() for a in ("--set", s)]
    observed: dict = {}
    if scenario.kill_in_checkpoint:
        paused, marker = pause(scenario.kill_in_checkpoint)
        submit(*job)
        _wait_for(
            marker.exists,
            f"round {scenario.kill_in_checkpoint}'s checkpoint",
            WAIT_S * scenario.kill_in_checkpoint,
            logs=logs(),
        )
        observed["checkpoints_at_kill"] = sorted(
            p.name for p in RunDirectory(run_dir(fed)).checkpoints_dir.iterdir()
        )
        kill_and_restart()
        paused.unlink()
        marker.unlink()
    if scenario.kill_mid_round:
        before = {s: fed.reservations(s, scenario.kill_mid_round) for s in scenario.honest}
        submit(*job) if not submissions else submit("--resume", RUN_NAME)
        _wait_for(
            lambda: all(fed.reservations(s, scenario.kill_mid_round) > before[s] for s in scenario.honest),
            f"the sites' reservations of round {scenario.kill_mid_round}",
            WAIT_S * scenario.kill_mid_round,
            logs=logs(),
        )
        kill_and_restart()
    # The revocation, while site-m is online, between the two rounds (the checkpoint before as a barrier).
    paused, marker = pause(scenario.revoke_before - 1)
    last = submit(*job) if not submissions else submit("--resume", RUN_NAME)
    _wait_for(
        marker.exists,
        f"round {scenario.revoke_before - 1}'s checkpoint",
        WAIT_S * scenario.revoke_before,
        logs=logs(),
    )
    SiteRegistry(fed.state).revoke(MALICIOUS)
    paused.unlink()
    observed["exit"] = last.process.wait(timeout=2 * WAIT_S)
    observed["killed_exits"] = [d.process.wait(timeout=120) for d in submissions[:-1]]
    observed["last_log"] = last.text()
    return observed


def run_dir(fed: Federation) -> Path:
    return fed.state.runs_dir / RUN_NAME


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    fed = start_faulty_federation(tmp_path_factory.mktemp("faults"), QUICK)
    try:
        observed = run_scenario(fed, QUICK)
        yield {
            **observed,
            "fed": fed,
            "run_dir": RunDirectory(run_dir(fed)),
            "audit": AuditLog(fed.state.audit_path).read(),
        }
    finally:
        fed.stop_all()


@pytest.mark.slow
def test_the_run_survives_a_sigkill_mid_checkpoint_with_every_round_aggregated_once(faulty_run) -> None:
    assert faulty_run["exit"] == 0, faulty_run["last_log"][-3000:]
    assert 0 not in faulty_run["killed_exits"]  # a killed submission does not report success
    # Killed mid-checkpoint: round 1's strategy state was written, its model file not moved into place.
    assert "round-001.state.pt" in faulty_run["checkpoints_at_kill"]
    assert "round-001.pt" not in faulty_run["checkpoints_at_kill"]
    events = faulty_run["run_dir"].read_events()
    assert [e["round"] for e in events if e["event"] == "aggregate-train"] == [1, 2]
    trained = sorted((e["round"], e["site"]) for e in events if e["event"] == "train")
    assert trained == [(r, s) for r in (1, 2) for s in QUICK.honest]
    assert faulty_run["run_dir"].completed_rounds() == [1, 2]
    starts = [e for e in faulty_run["audit"] if e["event"] == "run-started"]
    assert [(e["resume"], e["first_round"]) for e in starts] == [(False, 1), (True, 1)]
    assert len({e["run_id"] for e in starts}) == 1


@pytest.mark.slow
def test_the_killed_round_stays_counted_in_the_sites_ledgers(faulty_run) -> None:
    fed = faulty_run["fed"]
    events = faulty_run["run_dir"].read_events()
    for site in QUICK.honest:
        ledger = fed.ledger(site)
        (run_id,) = {r.run_id for r in ledger.releases()}
        # Round 1 was trained twice: first for the coordinator that was then killed.
        assert sorted(r.server_round for r in ledger.releases(run_id)) == [1, 1, 2]
        (last,) = [e for e in events if e["event"] == "train" and e["site"] == site and e["round"] == 2]
        assert last["epsilon"] == pytest.approx(ledger.run_epsilon(run_id), rel=1e-9)


@pytest.mark.slow
def test_malformed_replies_over_the_real_transport_are_rejected(faulty_run) -> None:
    # Both attempts at round 1 met a malformed reply: the killed one's is in the audit log only.
    attempts = [e for e in faulty_run["audit"] if e["event"] == "round-trained" and e["round"] == 1]
    assert [[r["site"] for r in e["rejected"]] for e in attempts] == [[MALICIOUS], [MALICIOUS]]
    for attempt, kind in zip(attempts, QUICK.sent, strict=True):
        assert KINDS[kind] in attempt["rejected"][0]["reason"], (kind, attempt)
    assert sorted(attempts[-1]["contributed"]) == sorted(QUICK.honest)
    events = faulty_run["run_dir"].read_events()
    (rejected,) = [e for e in events if e["event"] == "rejected" and e["stage"] == "training"]
    assert (rejected["site"], rejected["round"]) == (MALICIOUS, 1)
    participation = (faulty_run["run_dir"].root / "report.md").read_text().split("## Participation", 1)[1]
    assert f"| 1 | {MALICIOUS} | rejected (training) |" in participation


@pytest.mark.slow
def test_a_site_revoked_while_online_gets_no_further_message(faulty_run) -> None:
    fed = faulty_run["fed"]
    events = faulty_run["run_dir"].read_events()
    (revoked,) = [e for e in events if e["event"] == "rejected" and e["stage"] == "enrolment"]
    assert (revoked["site"], revoked["round"]) == (MALICIOUS, 2) and "revoked" in revoked["reason"]
    log = fed.sites[MALICIOUS].text()
    assert "round 1 answered" in log and "round 2 answered" not in log
    assert not [e for e in events if e.get("site") == MALICIOUS and e["round"] == 2 and e is not revoked]
    assert {s.name: s.status for s in SiteRegistry(fed.state).sites()}[MALICIOUS] == "revoked"  # listed, as revoked
    # ... and the SuperLink refused the site's own next request (no enrolled site is ever refused).
    assert re.search(r'"POST /v1/fleet/[a-z-]+ HTTP/1.1" 401', fed.coordinator.text())
    asked = {e["site"] for e in events if e["event"] in ("evaluate", "evaluate-refused") and e["round"] == 2}
    assert asked == set(QUICK.honest)


@pytest.mark.slow
def test_the_sites_traffic_went_through_the_fleet_proxy(faulty_run) -> None:
    fed = faulty_run["fed"]
    if fed.nginx is None:
        pytest.skip(
            "nginx is not installed (.ci/run installs it where it can): the sites dialled the coordinator"
        )
    access = (fed.root / "nginx" / "access.log").read_text()
    assert '"POST /v1/fleet/push-object HTTP/1.1" 200' in access
    assert '"POST /v1/fleet/pull-messages HTTP/1.1" 200' in access
    context = ssl.create_default_context(cafile=str(fed.ca))

    def status(method: str, path: str, length: int = 0) -> int:
        """The proxy's answer to a request announcing a body of ``length`` bytes (none sent)."""
        connection = http.client.HTTPSConnection("127.0.0.1", fed.site_port, context=context, timeout=30)
        try:
            connection.putrequest(method, path)
            connection.putheader("Content-Length", str(length))
            connection.endheaders()
            return connection.getresponse().status
        finally:
            connection.close()

    assert status("GET", "/v1/control/list-runs") == 404  # the Control API is not for the sites
    assert status("POST", "/v1/fleet/register-node") == 404  # nor self-registration
    assert status("GET", "/v1/fleet/pull-messages") == 403
    assert status("POST", "/v1/fleet/push-object", 11 * 1024**2) == 413
