"""Simulation on an existing multi-node Ray cluster: a head node and a worker node on this machine (loopback).

Starts `ray start --head` and a second node that joins it (``--cpus-per-node`` each), then runs a small
federation (tiny phantom sites, tiny network, no DP) with `study.simulation.run_simulation(...,
ray_address=...)`, what `neurofed simulate --ray-address HOST:PORT` runs. The sites' ClientApp is
wrapped to note the Ray node of every message it handles, so the benchmark shows that both nodes ran
sites. The same run on a private Ray instance of this machine (what `neurofed simulate` does by default)
is timed beside it. Prints the nodes, the messages each node handled, both wall times and both final
models' unseen-site Dice; stops both Ray nodes::

    .venv/bin/python bench/bench_ray_cluster.py [--sites 4] [--rounds 2] [--cpus-per-node 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from bench.bench_deployment import free_port  # noqa: E402

NODES_FILE_ENV = "NEUROFED_BENCH_NODES_FILE"
"""Where the wrapped ClientApp notes the node of each message (a Ray worker inherits the environment)."""

noting_app = ClientApp()


def _noted(kind: str, msg: Message, context: Context) -> Message:
    import ray

    from client.app import _handle

    with open(os.environ[NODES_FILE_ENV], "a") as f:
        f.write(json.dumps({"node": ray.get_runtime_context().get_node_id(), "kind": kind}) + "\n")
    return _handle(kind, msg, context)


@noting_app.query()
def query(msg: Message, context: Context) -> Message:
    return _noted("query", msg, context)


@noting_app.train()
def train(msg: Message, context: Context) -> Message:
    return _noted("train", msg, context)


@noting_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _noted("evaluate", msg, context)


def _ray(*args: str) -> None:
    ray = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray), *args], check=True, capture_output=True, text=True, timeout=300)


def _run(root: Path, name: str, settings: dict, ray_address: str | None) -> tuple[float, float]:
    """(wall seconds, unseen site's final mean Dice) of one run."""
    from contract.run_config import RunConfig
    from server.run_directory import RunDirectory
    from study.simulation import run_simulation

    config = RunConfig.from_flower({**settings, "run-dir": str(root / name), "data-root": str(root / "data")})
    started = time.perf_counter()
    run_dir = run_simulation(config, noting_app, progress=False, ray_address=ray_address)
    seconds = time.perf_counter() - started
    unseen = [
        e["metrics"]["dice-mean"]
        for e in RunDirectory(run_dir.root).read_events()
        if e["event"] == "evaluate" and e.get("role") == "holdout" and e["round"] == config.num_rounds
    ]
    return seconds, unseen[0] if unseen else float("nan")


def main() -> None:
    from bench.tiny_sites import write_tiny_site

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=4, help="sites, the last one unseen")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    args = parser.parse_args()

    # A short folder: Ray's Unix sockets live under its temp folder (107 characters at most).
    root = Path(tempfile.mkdtemp(prefix="nf-ray-", dir="/tmp"))
    port = free_port()
    try:
        for i in range(args.sites):
            write_tiny_site(root / "data" / f"site-{i + 1:02d}", 6, 1.0 + 0.2 * i, i)
        settings = {
            "num-server-rounds": args.rounds,
            "local-steps": args.local_steps,
            "num-sites": args.sites,
            "unseen-sites": 1,
            "network-preset": "tiny",
            "initial-model": "none",
            "patch-size": 16,
            "batch-size": 1,
            "spacing-mm": 4.0,
            "field-of-view-mm": "64,64,64",
            "test-fraction": 0.34,
            "eval-every": args.rounds,
            "dp": False,
        }
        os.environ[NODES_FILE_ENV] = str(root / "nodes-private.jsonl")
        private_s, private_dice = _run(root, "private", settings, None)

        cpus = str(args.cpus_per_node)
        temp = str(root / "ray")
        # A cluster's workers get the environment of its nodes' `ray start`, not the driver's.
        os.environ[NODES_FILE_ENV] = str(root / "nodes-cluster.jsonl")
        _ray("start", "--head", "--port", str(port), "--num-cpus", cpus, "--temp-dir", temp, "--disable-usage-stats")
        _ray("start", "--address", f"127.0.0.1:{port}", "--num-cpus", cpus)
        import ray

        ray.init(address=f"127.0.0.1:{port}", logging_level="ERROR", log_to_driver=False)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        ray.shutdown()
        cluster_s, cluster_dice = _run(root, "cluster", settings, f"127.0.0.1:{port}")
        handled = Counter(json.loads(line)["node"] for line in (root / "nodes-cluster.jsonl").read_text().splitlines())
    finally:
        try:
            _ray("stop", "--force")
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"(ray stop failed: {exc})")
        shutil.rmtree(root, ignore_errors=True)

    print(f"cluster: {len(nodes)} Ray nodes on loopback, {args.cpus_per_node} CPU each")
    for i, node in enumerate(nodes):
        role = "head" if node.get("Resources", {}).get("node:__internal_head__") else "worker"
        print(f"  node {i + 1} ({role}, {node['NodeID'][:12]}): {handled.get(node['NodeID'], 0)} messages handled")
    print(
        f"{args.sites} sites (1 unseen), {args.rounds} rounds x {args.local_steps} steps, tiny network: "
        f"{cluster_s:.1f} s on the two-node cluster, {private_s:.1f} s on a private Ray of this machine "
        f"({os.cpu_count()} cores); unseen-site Dice {cluster_dice:.3f} vs {private_dice:.3f}"
    )


if __name__ == "__main__":
    main()
