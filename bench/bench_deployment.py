"""Deployment vs simulation: what a message costs, and a round of the same job in both engines.

Prints, each on its own line (issue 14):

- ``message floor: F s``: query round trips from a ServerApp to an empty ClientApp
  (bench/empty-flower-app) through a real ``flower-superlink`` and ``flower-supernode`` (insecure,
  loopback): what Flower itself costs per message, whatever the app does;
- ``message overhead over the floor: S s``: what neurofed adds above that floor per message: a round of a
  one-site job with one local step deployed (below) minus the same round simulated minus the floor;
- ``deployment / simulation: R x``: a round of the main job (``--sites``, ``--local-steps``: by default
  enough for about 30 s of local training) deployed vs simulated.

Deployed: a real coordinator (`neurofed coordinator start`, TLS + SuperNode authentication, certificates
from deploy/make-certs.sh), the sites enrolled and started with `neurofed-site start` (``--worker``), the job
submitted with `neurofed run`. Simulated: Flower's simulation engine (`neurofed simulate`'s code path). A
round's time is between the aggregates of consecutive rounds in metrics.jsonl, from round 2 on (round 1
also prepares the data and starts processes); figures are means over rounds. Also printed: coordinator
start-up (command to port open) and site start-up (`neurofed-site start`, data check included, to the
SuperNode admitted).

With ``--scale 3,10`` it runs instead the job on 3, then 10 real site daemons and prints, per count, the
time per round and the coordinator's peak memory (RSS of its process tree: SuperLink, SuperExec, ServerApp).

Usage: .venv/bin/python bench/bench_deployment.py [--sites 3] [--local-steps 600] [--rounds 3]
    [--floor-messages 30] [--overhead-rounds 20] [--worker supervised|off] [--scale 3,10]
Prints the figures; writes nothing outside a temporary folder; stops every process it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def job_settings(n_sites: int, local_steps: int, rounds: int, run_dir: str) -> dict:
    """The benchmark job: tiny sites and network, no DP, evaluated only after its last round."""
    return {
        "num-server-rounds": rounds,
        "local-steps": local_steps,
        "network-preset": "tiny",
        "initial-model": "none",
        "patch-size": 16,
        "batch-size": 1,
        "num-sites": n_sites,
        "unseen-sites": 0,
        "spacing-mm": 4.0,
        "field-of-view-mm": "64,64,64",
        "test-fraction": 0.34,
        "eval-every": rounds,
        "dp": False,
        "round-timeout-s": 900.0,
        "run-dir": run_dir,
    }


def round_seconds(run_dir: Path) -> list[float]:
    """Wall seconds of the training of rounds 2, 3, ... (between consecutive aggregates in metrics.jsonl):
    round 1 also prepares the data and starts the processes."""
    from server.run_directory import RunDirectory

    times = {
        e["round"]: e["time"] for e in RunDirectory(run_dir).read_events() if e["event"] == "aggregate-train"
    }
    return [times[r] - times[r - 1] for r in sorted(times) if r - 1 in times]


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


def simulate(root: Path, settings: dict, name: str) -> list[float]:
    """The job in Flower's simulation engine; its rounds' seconds (`round_seconds`)."""
    import client.app as site_app
    from contract.run_config import RunConfig
    from study.simulation import run_simulation

    run_dir = root / f"simulation-{name}"
    config = RunConfig.from_flower({**settings, "run-dir": str(run_dir), "data-root": str(root / "data")})
    run_simulation(config, site_app.app, progress=False)
    return round_seconds(run_dir)


EMPTY_APP = ROOT / "bench" / "empty-flower-app"


def start_logged(
    command: list[str], log: Path, env: dict[str, str], processes: list[subprocess.Popen]
) -> subprocess.Popen:
    """Start ``command`` in its own session, its output into ``log``; remember it in ``processes``."""
    process = subprocess.Popen(
        command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
    )
    processes.append(process)
    return process


def message_floor(root: Path, messages: int) -> list[float]:
    """Seconds of each of ``messages`` query round trips from a ServerApp to an empty ClientApp through a
    real SuperLink and SuperNode (insecure, loopback): what Flower itself costs per message."""
    from bench.process_tree import stop_process_tree
    from server.flower_control import flower_environment, flower_executable

    home, timings = root / "floor-flwr-home", root / "floor-timings.json"
    home.mkdir(parents=True)
    link_port, node_port = free_port(), free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "floor"\n\n[superlink.floor]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = flower_environment(home)
    processes: list[subprocess.Popen] = []
    try:
        start_logged(
            [flower_executable("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation"]
            + ["--database", ":flwr-in-memory:", "--host", "127.0.0.1", "--port", str(link_port)],
            root / "floor-superlink.log",
            env,
            processes,
        )
        wait_until(lambda: port_open(link_port), "the empty app's SuperLink", 120)
        start_logged(
            [flower_executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}"]
            + ["--port", str(node_port)],
            root / "floor-supernode.log",
            env,
            processes,
        )
        return run_empty_app("floor", env, timings, messages)
    finally:
        for process in reversed(processes):
            stop_process_tree(process)


def empty_app(root: Path) -> Path:
    """A copy of the empty app with this checkout's contract/version.py: a site runs only bundles that
    speak its contract version (client/approved_apps.py), whatever else they hold."""
    from contract.version import VERSION_FILE

    app = root / EMPTY_APP.name
    if not app.is_dir():
        shutil.copytree(EMPTY_APP, app)
        (app / VERSION_FILE).parent.mkdir(parents=True)
        shutil.copy(ROOT / VERSION_FILE, app / VERSION_FILE)
    return app


def run_empty_app(connection: str, env: dict[str, str], timings: Path, messages: int) -> list[float]:
    """Submit the empty app to the SuperLink ``connection`` names; the seconds of its query round trips."""
    from server.flower_control import flower_executable

    settings = f"messages={messages} timings-file={json.dumps(str(timings))}"
    app = empty_app(timings.parent)
    subprocess.run(
        [flower_executable("flwr"), "run", str(app), connection, "--run-config", settings],
        env=env, cwd=timings.parent, check=True, capture_output=True,
    )
    wait_until(timings.is_file, "the empty app's timings", 600)
    return json.loads(timings.read_text())


def deployed_floor(root: Path, connection, approved: Path, messages: int) -> list[float]:
    """The empty app's round trips through the deployed coordinator and sites themselves (TLS, SuperNode
    authentication, the sites' approval check and idle poll; its ClientApp does not use the site worker):
    the floor neurofed's messages stand on."""
    from server.flower_control import CONNECTION_NAME, FlowerControl, flower_executable

    with FlowerControl(connection) as control:
        built = root / "empty-app-bundle"
        built.mkdir()
        subprocess.run(
            [flower_executable("flwr"), "build", "--app", str(empty_app(root))],
            env=control.environment, cwd=built, check=True, capture_output=True,
        )
        (bundle,) = built.glob("*.fab")
        subprocess.run(
            [sys.executable, "-m", "client.cli", "approve", str(bundle), "--approved-apps", str(approved)],
            env=control.environment, cwd=ROOT, check=True, capture_output=True,
        )
        return run_empty_app(CONNECTION_NAME, control.environment, root / "deployed-floor.json", messages)


def deploy(root: Path, settings: dict, label: str, worker: str = "supervised", floor_messages: int = 0) -> dict:
    """The job on the deployment engine over loopback; its rounds' seconds, the start-up times and, with
    ``floor_messages``, the empty app's round trips through the same coordinator and sites."""
    from bench.process_tree import stop_process_tree
    from client.site_keys import generate_site_keys
    from server.coordinator_state import Connection, CoordinatorState
    from server.flower_control import flower_environment
    from server.site_registry import SiteRegistry

    env = {
        **flower_environment(root / "flwr-home"),
        # One torch thread per site, as each simulated site gets: several sites each using every core of
        # this one machine would oversubscribe it (a hospital's site has its machine to itself).
        "OMP_NUM_THREADS": "1",
    }
    data, root = root / "data", root / f"deployment-{label}"
    root.mkdir()
    n_sites = int(settings["num-sites"])
    certs = root / "certs"
    subprocess.run(
        ["bash", str(ROOT / "deploy" / "make-certs.sh"), str(certs)], check=True, capture_output=True
    )
    port, state = free_port(), CoordinatorState(root / "coordinator")
    processes: list[subprocess.Popen] = []

    def launch(args: list[str], log: Path) -> subprocess.Popen:
        return start_logged([sys.executable, "-m", *args], log, env, processes)

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
                + ["--key", str(keys.private_key), "--data", str(data / name), "--budget", "10"]
                + ["--allow-no-dp", "--approved-apps", str(approved), "--worker", worker]  # the job has no DP
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
        floor = []
        if floor_messages:
            connection = Connection(f"127.0.0.1:{port}", certs / "ca.crt")
            floor = deployed_floor(root, connection, approved, floor_messages)
        args = [a for k, v in {**settings, "run-dir": "runs/bench"}.items() for a in ("--set", f"{k}={_toml(v)}")]
        with PeakMemory(processes[0].pid) as coordinator_memory:
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
            "rounds_s": round_seconds(state.runs_dir / "bench"),
            "floor_s": floor,
            "coordinator_start_s": coordinator_s,
            "site_start_s": max(admitted.values()),
            "site_start_min_s": min(admitted.values()),
            "coordinator_peak_bytes": coordinator_memory.peak_bytes,
        }
    finally:
        for process in reversed(processes):
            stop_process_tree(process)


class PeakMemory:
    """The largest resident memory (RSS) of a process and its descendants (the coordinator: its SuperLink,
    SuperExec and the run's ServerApp), sampled every 0.25 s while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.peak_bytes = pid, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        from bench.process_tree import tree_rss_bytes

        while not self._done.wait(0.25):
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.pid))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def scale(root: Path, counts: list[int], local_steps: int, rounds: int, worker: str) -> None:
    """Real site daemons on loopback, ``counts`` of them in turn, completing the same job: time per round
    and the coordinator's peak memory."""
    print(f"sites | round s (mean of rounds 2..{rounds}) | coordinator peak RSS MiB | slowest site start-up s")
    for n in counts:
        result = deploy(root, job_settings(n, local_steps, rounds, ""), f"scale-{n}", worker)
        print(
            f"{n:5d} | {statistics.mean(result['rounds_s']):.1f} | "
            f"{result['coordinator_peak_bytes'] / 2**20:.0f} | {result['site_start_s']:.1f}",
            flush=True,
        )


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
    parser.add_argument("--sites", type=int, default=3, help="sites of the main job")
    parser.add_argument(
        "--local-steps", type=int, default=600, help="main job: local steps (enough for 30 s of training)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="main job: rounds (round 1 is not timed)")
    # The floor's messages range over 1.1..2.8 s: 10 of them (and 8 rounds) left the overhead uncertain by
    # about 0.25 s, 30 (and 20 rounds) by about 0.1 s (BENCHMARKS.md, "Seconds per message, deployed").
    parser.add_argument("--floor-messages", type=int, default=30, help="messages to the empty app")
    parser.add_argument("--overhead-rounds", type=int, default=20, help="rounds of the one-site, one-step job")
    parser.add_argument("--worker", default="supervised", choices=("supervised", "off"), help="the sites' --worker")
    parser.add_argument(
        "--scale",
        default="",
        metavar="N,N,...",
        help="instead of the lines above: a job with --local-steps and --rounds on N real site daemons in turn, "
        "e.g. 3,10 (time per round, coordinator memory)",
    )
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="neurofed-bench-deploy-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("FLWR_HOME", str(root / "flwr-home-sim"))
        counts = [int(n) for n in args.scale.split(",") if n]
        for i in range(max([args.sites, *counts])):
            write_tiny_site(root / "data" / f"site-{i + 1:02d}", 3, 1.0 + 0.3 * i, i)
        if counts:
            scale(root, counts, args.local_steps, args.rounds, args.worker)
            return
        bare_floor = message_floor(root, args.floor_messages)
        # One site, one local step: a round is one training message and next to no computation.
        small = job_settings(1, 1, args.overhead_rounds, "")
        small_simulated = simulate(root, small, "one-step")
        small_deployed = deploy(root, small, "one-step", args.worker, args.floor_messages)
        floor = small_deployed["floor_s"]
        job = job_settings(args.sites, args.local_steps, args.rounds, "")
        simulated = simulate(root, job, "job")
        deployed = deploy(root, job, "job", args.worker)
    mean = statistics.mean
    overhead = mean(small_deployed["rounds_s"]) - mean(small_simulated) - mean(floor)
    load = os.getloadavg()[0]
    print(f"message floor: {mean(floor):.2f} s")
    print(f"message overhead over the floor: {overhead:.2f} s")
    print(f"deployment / simulation: {mean(deployed['rounds_s']) / mean(simulated):.2f} x")
    print(
        f"  floor: mean of {len(floor)} query round trips to an empty Flower app (bench/empty-flower-app, its "
        f"ServerApp checking for the reply every 50 ms) through the deployed coordinator and site below (TLS, "
        f"SuperNode authentication, the site's approval check; {min(floor):.1f}..{max(floor):.1f} s); the same "
        f"through a bare insecure SuperLink and SuperNode: {mean(bare_floor):.2f} s "
        f"({min(bare_floor):.1f}..{max(bare_floor):.1f} s; Flower's idle SuperNode asks every 3 s, a neurofed "
        "site's every 0.5 s)"
    )
    print(
        f"  overhead: a one-site, one-step round deployed ({mean(small_deployed['rounds_s']):.2f} s, mean of "
        f"{len(small_simulated)} rounds) minus simulated ({mean(small_simulated):.2f} s) minus the floor; "
        f"sites with --worker {args.worker}"
    )
    print(
        f"  job: {args.sites} sites, tiny U-Net, 16^3 patches, {args.local_steps} local steps, no DP; a round "
        f"(mean of rounds 2..{args.rounds}) {mean(simulated):.1f} s simulated, "
        f"{mean(deployed['rounds_s']):.1f} s deployed"
    )
    print(f"coordinator start-up (to port open): {deployed['coordinator_start_s']:.1f} s")
    print(
        f"site start-up (check + SuperNode admitted): {deployed['site_start_min_s']:.1f} s fastest, "
        f"{deployed['site_start_s']:.1f} s slowest of {args.sites} started together"
    )
    print(f"(1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
