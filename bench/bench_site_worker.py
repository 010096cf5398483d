"""Per-message cost of a site's ClientApp process: cold (it loads everything) vs forwarding to the warm worker.

Flower's SuperNode starts a fresh ClientApp process for every message. This measures what such a process
costs without the SuperNode around it: a fresh Python process that imports the ClientApp (client/app.py)
and answers one query message of a tiny site (data preprocessed and cached beforehand), either running
the handler itself (cold: the node config names no worker) or forwarding it to a running site worker
(client/site_worker.py). The SuperNode's own per-message cost comes on top of both.

Usage: .venv/bin/python bench/bench_site_worker.py [--repeats 5]
Prints `cold ClientApp message: S s`, `forwarded message: S s` and `forwarder import: S s` (medians).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ONE_MESSAGE = """
import sys, time
started = time.perf_counter()
from flwr.app import ConfigRecord, Context, Message, RecordDict
import client.app as site_app
imported = time.perf_counter() - started
from flwr.supercore.task_identity import TaskIdentity
from contract.run_config import RunConfig
from contract.site_task import site_task_record
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
run = RunConfig(spacing_mm=4.0, field_of_view_mm="64,64,64", network_preset="tiny", dp=False)
msg = Message(RecordDict({"config": ConfigRecord(site_task_record(run, server_round=1, run_id="r"))}),
              dst_node_id=7, message_type="query")
config = eval(sys.argv[1])
reply = site_app.app(msg, Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={}))
assert reply.content["site"]["site-id"] == "site-a"
print(imported, time.perf_counter() - started)
"""


def one_message(config: dict, env: dict) -> tuple[float, float]:
    """(import seconds, total seconds) of a fresh process answering one query, wall time around it."""
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", ONE_MESSAGE, repr(config)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    imported = float(out.stdout.split()[0])
    return imported, wall


def main() -> None:
    from bench.tiny_sites import write_tiny_site
    from client.site_worker import worker_command
    from client.worker_link import SOCKET_KEY, TOKEN_KEY, worker_paths
    from client.worker_supervisor import answers
    from contract.version import CONTRACT_VERSION, CONTRACT_VERSION_KEY

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tiny_site(root / "site-a", 6, 1.0, 0)
        _, sock, token = worker_paths(root / "state")
        cold = {
            "data-dir": str(root / "site-a"),
            "site-id": "site-a",
            "state-dir": str(root / "state"),
            "cache-dir": str(root / "cache"),
            "min-test-subjects": 1,
            CONTRACT_VERSION_KEY: CONTRACT_VERSION,
        }
        warm = {**cold, SOCKET_KEY: str(sock), TOKEN_KEY: str(token)}
        line = " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in warm.items())
        worker = subprocess.Popen(worker_command(line), env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            while not answers(sock):
                time.sleep(0.2)
            one_message(cold, env)  # fills the preprocessed cache, so both sides read it from there
            one_message(warm, env)  # the worker loads the data once
            colds = [one_message(cold, env) for _ in range(args.repeats)]
            warms = [one_message(warm, env) for _ in range(args.repeats)]
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
    print(f"cold ClientApp message: {statistics.median(w for _, w in colds):.2f} s")
    print(f"forwarded message: {statistics.median(w for _, w in warms):.2f} s")
    print(f"forwarder import: {statistics.median(i for i, _ in warms):.2f} s")


if __name__ == "__main__":
    main()
