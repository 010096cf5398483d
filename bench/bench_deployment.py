"""Deployment vs simulation: wall time of one round of the same job, and start-up time of coordinator and site.

Runs, in one process tree on this machine:

1. The job in Flower's simulation engine (`neurofed simulate`'s code path).
2. The same job on Flower's deployment engine over loopback: a real coordinator (`neurofed coordinator
   start`, TLS + SuperNode authentication, certificates from deploy/make-certs.sh), the sites enrolled and
   started with `neurofed-site start`, the job submitted with `neurofed run`.

"One round" is round 2's training (the time between the aggregates of rounds 1 and 2 in metrics.jsonl;
the job evaluates only after its last round), so data preparation and process start-up of round 1 are
not in it. Coordinator start-up: from the command to its port accepting connections. Site start-up: from
`neurofed-site start` (data check included) to the SuperNode being admitted by the coordinator.

Usage: .venv/bin/python bench/bench_deployment.py [--sites 3] [--local-steps 5]
Prints the figures; writes nothing outside a temporary folder; stops every process it starts.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def job_settings(n_sites: int, local_steps: int, run_dir: str) -> dict:
    return {
        "num-server-rounds": 2,
        "local-steps": local_steps,
        "patch-size": 16,
        "batch-size": 1,
        "num-sites": n_sites,
        "unseen-sites": 0,
        "spacing-mm": 4.0,
        "field-of-view-mm": "64,64,64",
        "test-fraction": 0.34,
        "eval-every": 2,
        "dp": False,
        "round-timeout-s": 900.0,
        "run-dir": run_dir,
    }


def round_two_seconds(run_dir: Path) -> float:
    from server.run_directory import RunDirectory

    times = {
        e["round"]: e["time"] for e in RunDirectory(run_dir).read_events() if e["event"] == "aggregate-train"
    }
    return times[2] - times[1]


def wait_until(condition, what: str, timeout_s: float = 600.0) -> float:
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout_s:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return time.perf_counter() - start


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def simulate(root: Path, n_sites: int, local_steps: int) -> float:
    import client.app as site_app
    from contract.run_config import RunConfig
    from study.simulation import run_simulation

    settings = job_settings(n_sites, local_steps, str(root / "simulation"))
    config = RunConfig.from_flower({**settings, "data-root": str(root / "data")})
    run_simulation(config, site_app.app, progress=False)
    return round_two_seconds(root / "simulation")


def deploy(root: Path, n_sites: int, local_steps: int) -> dict[str, float]:
    from bench.process_tree import stop_process_tree
    from client.site_keys import generate_site_keys
    from server.coordinator_state import CoordinatorState
    from server.site_registry import SiteRegistry

    env = {
        **os.environ,
        "FLWR_HOME": str(root / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    certs = root / "certs"
    subprocess.run(
        ["bash", str(ROOT / "deploy" / "make-certs.sh"), str(certs)], check=True, capture_output=True
    )
    port, state = free_port(), CoordinatorState(root / "coordinator")
    processes: list[subprocess.Popen] = []

    def launch(args: list[str], log: Path) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        processes.append(process)
        return process

    try:
        launch(
            [
                "server.cli",
                "coordinator",
                "start",
                "--state-dir",
                str(state.root),
                "--address",
                f"127.0.0.1:{port}",
            ]
            + [
                "--ca-cert",
                str(certs / "ca.crt"),
                "--cert",
                str(certs / "server.crt"),
                "--key",
                str(certs / "server.key"),
            ],
            root / "coordinator.log",
        )
        coordinator_s = wait_until(lambda: port_open(port), "the coordinator's port")
        registry = SiteRegistry(state)
        names = [f"site-{i + 1:02d}" for i in range(n_sites)]
        keys_of = {name: generate_site_keys(root / "keys" / name) for name in names}
        for name in names:
            registry.enroll(keys_of[name].public_key, name)
        # Every site approves the bundle built from this checkout (what `neurofed run` submits).
        approved = root / "approved-apps.txt"
        subprocess.run(
            [sys.executable, "-m", "client.cli", "approve", "--installed", "--approved-apps", str(approved)],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        # The sites start together, as after a power cut.
        launched: dict[Path, float] = {}
        for name in names:
            keys = keys_of[name]
            log = root / f"{name}.log"
            launched[log] = time.perf_counter()
            launch(
                ["client.cli", "start", "--coordinator", f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt")]
                + ["--key", str(keys.private_key), "--data", str(root / "data" / name), "--budget", "10"]
                + [
                    "--allow-no-dp",
                    "--approved-apps",
                    str(approved),
                ]  # the job compares with simulation without DP
                + [
                    "--state-dir",
                    str(root / "sites" / name),
                    "--site-id",
                    name,
                    "--runtime-port",
                    str(free_port()),
                ],
                log,
            )
        # Each site's start-up: from its `neurofed-site start` to the coordinator admitting its SuperNode.
        admitted: dict[Path, float] = {}

        def all_admitted() -> bool:
            for log, at in launched.items():
                if log not in admitted and "SuperNode ID:" in log.read_text(errors="replace"):
                    admitted[log] = time.perf_counter() - at
            return len(admitted) == len(launched)

        wait_until(all_admitted, "the sites to be admitted")
        settings = job_settings(n_sites, local_steps, "runs/bench")
        args = [a for k, v in settings.items() for a in ("--set", f"{k}={_toml(v)}")]
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", "run", "--state-dir", str(state.root), "--no-stream", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the deployed run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return {
            "round_s": round_two_seconds(state.runs_dir / "bench"),
            "coordinator_start_s": coordinator_s,
            "site_start_s": max(admitted.values()),
            "site_start_min_s": min(admitted.values()),
        }
    finally:
        for process in reversed(processes):
            stop_process_tree(process)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def main() -> None:
    from bench.tiny_sites import write_tiny_site

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="neurofed-bench-deploy-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("FLWR_HOME", str(root / "flwr-home-sim"))
        for i in range(args.sites):
            write_tiny_site(root / "data" / f"site-{i + 1:02d}", 3, 1.0 + 0.3 * i, i)
        simulated = simulate(root, args.sites, args.local_steps)
        deployed = deploy(root, args.sites, args.local_steps)
    load = os.getloadavg()[0]
    print(f"job: {args.sites} sites, tiny U-Net, 16^3 patches, {args.local_steps} local steps, no DP")
    print(f"one round (round 2 training), simulation:  {simulated:7.1f} s")
    print(f"one round (round 2 training), deployment:  {deployed['round_s']:7.1f} s")
    print(f"deployment / simulation:                   {deployed['round_s'] / simulated:7.2f} x")
    print(f"coordinator start-up (to port open):       {deployed['coordinator_start_s']:7.1f} s")
    print(
        f"site start-up (check + SuperNode admitted): {deployed['site_start_min_s']:6.1f} s fastest, "
        f"{deployed['site_start_s']:.1f} s slowest of {args.sites} started together"
    )
    print(f"(1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
