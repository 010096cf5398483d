"""deploy/rehearse.sh: the operator guide's own commands run on loopback, and the guide showing each of them.

The first test reads both files: every command the rehearsal runs appears verbatim in deploy/README.md, so
the guide cannot drift from what works. The second runs the rehearsal (a coordinator, the Fleet-only proxy
where nginx is installed, three sites, two jobs, an upgrade, a revocation mid-run) and checks what it
left behind, beyond the script's own checks.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench.process_tree import stop_process_tree
from client.approved_apps import ACCEPTED_EVENT, AUDIT_LOG_FILE, read_audit_events
from models.model_file import load_model
from privacy.privacy_ledger import PrivacyLedger
from server.audit_log import AuditLog
from server.run_directory import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "rehearse.sh"
GUIDE = ROOT / "deploy" / "README.md"
GUIDE_MARKER = "# --- the guide's commands"
PLUMBING = re.compile(r"^(#|_|[A-Z_][A-Z0-9_]*=|export |echo\b|if |else$|fi$|then$)")
"""Lines of the script that are not the guide's: comments, its helpers (``_name``), variables, output."""


def rehearsal_commands(script: str) -> list[str]:
    """The commands of the guide the rehearsal runs: every line after `GUIDE_MARKER` but plumbing."""
    body = script.split(GUIDE_MARKER, 1)[1].split("\n", 1)[1]
    return [line.strip() for line in body.splitlines() if line.strip() and not PLUMBING.match(line.strip())]


def test_every_command_of_the_rehearsal_is_in_the_guide_verbatim() -> None:
    commands = rehearsal_commands(SCRIPT.read_text())
    guide = GUIDE.read_text()
    missing = [command for command in commands if command not in guide]
    assert not missing, "deploy/rehearse.sh runs commands deploy/README.md does not show:\n" + "\n".join(
        missing
    )
    # It runs every step of the guide: certificates, coordinator, proxy, enrolment, the sites' set-up, jobs,
    # upgrade, revocation, what the audit log and a ledger say.
    ran = " ".join(commands)
    for step in (
        "deploy/make-certs.sh",
        "neurofed coordinator start",
        "nginx -e stderr",
        "neurofed coordinator enroll",
        "neurofed-site keygen",
        "neurofed-site check",
        "neurofed-site budget --init",
        "neurofed-site approve --installed",
        "neurofed-site start",
        "--role holdout",
        "neurofed coordinator sites",
        "neurofed run deploy/job.toml",
        "flwr build",
        "--replace",
        "neurofed coordinator revoke",
        "jq -c",
        "neurofed-site budget --ledger",
    ):
        assert step in ran, step
    assert ran.count("neurofed run deploy/job.toml") == 2  # two jobs in a row


def _stop_detached_nginx(prefix: Path) -> None:
    """nginx detaches from the script: stop the one the rehearsal started in ``prefix``, if still there."""
    pid_file = prefix / "nginx.pid"
    if not pid_file.is_file():
        return
    pid = int(pid_file.read_text().split()[0])
    try:
        started_here = str(prefix) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        if started_here:
            os.kill(pid, signal.SIGQUIT)
    except (OSError, ValueError):
        pass  # already gone


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("jq") is None, reason="the rehearsal reads the audit logs with jq, not installed")
def test_the_rehearsal_runs_the_whole_guide() -> None:
    # A short folder: each site's worker socket lies under it, and a Unix socket path has at most 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="nf-rehearsal-")) / "r"
    try:
        _rehearse_and_check(folder)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


def _rehearse_and_check(folder: Path) -> None:
    env = {**os.environ, "NEUROFED_VENV": str(Path(sys.executable).parents[1])}
    process = subprocess.Popen(
        ["bash", str(SCRIPT), str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=1800)  # ~90 s on two idle cores; far more on a loaded machine
    finally:
        stop_process_tree(process, signal.SIGTERM, grace_s=10)  # the script's trap stops its daemons
        _stop_detached_nginx(folder / "nginx")
    assert process.returncode == 0, output[-6000:]
    assert "rehearsal complete" in output
    if shutil.which("nginx"):
        assert "ok: the proxy passes nothing but the Fleet API" in output
    else:
        assert "nginx is not installed: the sites dial the coordinator directly" in output

    audit = AuditLog(folder / "coordinator" / "audit.jsonl").read()
    rounds = [e for e in audit if e["event"] == "round-trained"]
    assert sorted(rounds[0]["contributed"]) == ["hospital-a", "hospital-b"]
    assert all(str(e[k]).isdigit() for e in audit for k in ("node_id", "flower_run_id") if e.get(k))
    # Revoked once the second job had found its sites: dropped from the round it was in (training, or
    # evaluation when its update was in already), with the revocation as the reason; the run went on.
    second_run = rounds[1]["run_id"]
    dropped = [
        (e["event"], d)
        for e in audit
        if e["event"] in ("round-trained", "round-evaluated") and e["run_id"] == second_run
        for d in e.get("dropped", [])
    ]
    assert {d["site"] for _, d in dropped} == {"hospital-b"} and "was revoked" in dropped[0][1]["reason"]
    if dropped[0][0] == "round-trained":
        assert rounds[1]["contributed"] == ["hospital-a"]
        second = RunDirectory(folder / "coordinator" / "runs" / "second")
        report = (second.root / "report.md").read_text()
        assert (
            "| 1 | hospital-b | dropped (training) |"
            in report.split("## Participation", 1)[1].split("\n## ", 1)[0]
        )

    # Two runs under one lifetime budget: composed, not summed, and both allowed.
    summary = PrivacyLedger(folder / "hospital-a" / "state" / "privacy-ledger.jsonl").summary()
    assert len(summary.runs) == 2 and summary.budget.epsilon == 10
    assert summary.spent_epsilon < sum(run.epsilon for run in summary.runs) and summary.left_epsilon > 0

    # The model's way home: the holdout site holds each run's final model, with the coordinator's hash.
    finished = {e["run_id"]: e["weights_sha256"] for e in audit if e["event"] == "run-finished"}
    received = [
        e
        for e in read_audit_events(folder / "hospital-c" / "state" / AUDIT_LOG_FILE)
        if e["event"] == "model-received"
    ]
    assert {e["run_id"]: e["weights_sha256"] for e in received} == finished
    assert load_model(received[-1]["model_file"]).weights_sha256 == finished[received[-1]["run_id"]]

    # The upgrade: the second job ran the new release's bundle, the one the sites approved.
    accepted = [
        e["fab_hash"]
        for e in read_audit_events(folder / "hospital-a" / "state" / AUDIT_LOG_FILE)
        if e["event"] == ACCEPTED_EVENT
    ]
    assert len(set(accepted)) == 2 and accepted[-1] in (folder / "approved-apps.txt").read_text()

    # The revoked site, restarted, says why in its own log; the operator still sees it, as revoked.
    refused = (folder / "logs" / "hospital-b-again.log").read_text()
    assert "refused this site's key (SHA256:" in refused and "revoked" in refused
    assert "hospital-b" in output and re.search(r"hospital-b\s.*revoked\s+enrolled", output)
