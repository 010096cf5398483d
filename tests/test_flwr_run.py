"""`flwr run .` as the README documents it works from a fresh checkout: with an empty data-root the app
synthesizes its sites, runs the federation on Flower's local SuperLink and ends with the full report
(baselines and cross-site evaluation), printing each phase's progress; the test stops the SuperLink the
command left running."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.bench_deployment import free_port
from bench.process_tree import processes_naming, stop_processes
from contract.run_layout import EVALUATION_FILE, REPORT_HTML, REPORT_MD
from server.flower_control import flower_environment

ROOT = Path(__file__).resolve().parents[1]
FLWR = Path(sys.executable).parent / "flwr"

# Tiny and fast: 2 sites (one never trains) of 2 synthesized subjects on a 16^3 grid (8 mm, 128 mm field of
# view: one sliding window), one round of one step.
TINY = {
    "num-sites": 2,
    "unseen-sites": 1,
    "simulated-subjects-per-site": 2,
    "simulated-unseen-subjects": 2,
    "num-server-rounds": 1,
    "local-steps": 1,
    "patch-size": 16,
    "batch-size": 1,
    "spacing-mm": 8.0,
    "field-of-view-mm": "128,128,128",
    "network-preset": "tiny",
    "initial-model": "none",
    "dp": False,
    "simulated-min-test-subjects": 1,
}


# Seconds until the run's first log line (5-40 s on a 2-core machine: the SuperLink, then Ray, start first),
# and for the whole run (20-70 s).
RUN_SILENT_S = 150
RUN_S = 300


def _toml(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower()


def _flwr_run(command: list[str], flwr_home: Path) -> tuple[int, str]:
    """Run ``flwr run ... --stream`` on a local SuperLink of its own; its exit code and output. Fails, with
    the output and the SuperLink's log, when the run logs nothing within `RUN_SILENT_S` or does not end
    within `RUN_S`. Stops the SuperLink (and its SuperExec, simulation and Ray) after."""
    lines: list[str] = []
    env = flower_environment(flwr_home) | {
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    process = subprocess.Popen(
        [*command, "--stream"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    reader = threading.Thread(target=lambda: [lines.append(line) for line in process.stdout], daemon=True)
    reader.start()
    try:
        started = time.monotonic()
        while process.poll() is None and time.monotonic() - started < RUN_SILENT_S and not _run_logged(lines):
            time.sleep(0.5)
        if process.poll() is None and not _run_logged(lines):
            pytest.fail(
                f"the run logged nothing for {RUN_SILENT_S} s:\n{''.join(lines)}{_superlink_log(flwr_home)}"
            )
        try:
            process.wait(timeout=RUN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"`flwr run` did not end within {RUN_S} s:\n{''.join(lines)}{_superlink_log(flwr_home)}"
            )
        reader.join(timeout=10)
        return process.returncode, "".join(lines)
    finally:
        process.kill()
        # `flwr run` leaves its local SuperLink (and SuperExec) running: stop what was started with our home.
        stop_processes(processes_naming(str(flwr_home)))


def _run_logged(lines: list[str]) -> bool:
    """Whether the run's log stream carried a line (every line after Flower's "Starting logstream")."""
    streaming = [i for i, line in enumerate(lines) if "Starting logstream for run_id" in line]
    return bool(streaming) and len(lines) > streaming[0] + 1


def _superlink_log(flwr_home: Path) -> str:
    logs = sorted(flwr_home.glob("local-superlink/*.log"))
    return "".join(f"\n--- {log}:\n{log.read_text()}" for log in logs)


@pytest.mark.skipif(not FLWR.is_file(), reason="Flower's `flwr` command is not installed beside this Python")
def test_flwr_run_synthesizes_its_sites_and_ends_with_the_full_report(tmp_path):
    run_dir = tmp_path / "run"
    settings = " ".join(f"{k}={_toml(v)}" for k, v in {**TINY, "run-dir": str(run_dir)}.items())
    command = [str(FLWR), "run", ".", "--federation-config", "num-supernodes=2", "--run-config", settings]
    flwr_home = tmp_path / "flwr-home"
    returncode, output = _flwr_run(command, flwr_home)
    assert processes_naming(str(flwr_home)) == [], "the local SuperLink is still running"
    assert returncode == 0, output
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == ["site-01", "site-02"]
    assert (run_dir / EVALUATION_FILE).is_file(), output
    markdown = (run_dir / REPORT_MD).read_text()
    assert markdown.index("## Summary") < markdown.index("## Figures")
    assert "interim report" not in markdown
    summary = markdown[markdown.index("## Summary") : markdown.index("## Figures")]
    assert "Unseen site site-02" in summary
    assert "| site-01 (local-only) |" in summary and "| pooled |" in summary
    assert (run_dir / REPORT_HTML).is_file()
    # Every phase's progress reached the stream, with counts, up to its last step.
    evaluation = json.loads((run_dir / EVALUATION_FILE).read_text())
    scored = len(evaluation["results"])  # federated, local-only and pooled on every test subject
    audited = sum(len(s["train_subjects"]) + len(s["test_subjects"]) for s in evaluation["sites"])
    for finished in (
        "synthesizing: 4/4",
        "federated run: 3/3 round 1 evaluating",
        "training local-only:site-01: 1/1",
        "training pooled: 1/1",
        f"cross-site evaluation: {scored}/{scored}",
        f"membership audit: {audited}/{audited}",
        f"open in a browser: {(run_dir / REPORT_HTML).as_uri()}",
    ):
        assert finished in output, output


class _Nodes:
    """A grid that only lists its nodes."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def test_a_simulation_with_fewer_supernodes_than_sites_is_refused_at_once():
    from models.errors import NeurofedError
    from study.flower_app import check_simulated_sites, is_simulation

    check_simulated_sites(_Nodes(4), 4)
    with pytest.raises(NeurofedError, match='num-supernodes=4".*num-sites=2'):
        check_simulated_sites(_Nodes(2), 4)
    assert not is_simulation(_Nodes(4))  # a deployment's grid: the coordinator's run only
