"""Cost of the federation itself, on one machine with Flower's simulation engine (CPU).

1. Overhead: for every round of one run, the round's wall time (server sends the global model ->
   sites train -> replies screened and aggregated -> checkpoint written) minus the slowest site's own
   training time (the ``seconds`` each site reports), as a share of the round (target < 5 %). Rounds
   that evaluate are left out (evaluation is not federation overhead): the run evaluates after its last
   round only. Times come from the run's events (wall-clock ``time``, the same events metrics.jsonl
   holds, plus the round-start / checkpoint progress events the ServerApp emits to its hook).
2. Bytes per round: the model arrays in every training message, to the sites and back (the serialized
   ``Array.data`` Flower sends), against 2 x model size x training sites.
3. Scale: 3, 10 and 20 sites (one unseen) with little data each (2 subjects at 4 mm), tiny network,
   2 rounds of a few steps. Each site count runs in its own process; its peak memory is the largest sum
   of resident memory (RSS) over that process and all its descendants (Ray's raylet, GCS and workers),
   sampled from /proc every 0.25 s. Time per round is the training round's wall time.

Figures are printed, never asserted::

    .venv/bin/python bench/bench_federation.py [--out /tmp/neurofed-bench-federation] [--sites 3,10,20]
        [--skip-scale] [--skip-overhead]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@dataclass(frozen=True)
class Workload:
    """A part of the benchmark: phantom sites of ``subjects_per_site`` subjects at ``spacing_mm``, and the
    RunConfig settings of its runs (besides these: one unseen site, no DP, the tiny network, evaluation
    after the last round only; each run adds its folders)."""

    subjects_per_site: int
    spacing_mm: float
    run: dict[str, Any]

    def config(self, **sites_and_folders: Any):
        """The RunConfig of one run, with ``sites_and_folders`` (``num_sites``, ``data_root``, ``run_dir``)."""
        from contract.run_config import RunConfig

        # Random weights: the built-in starting model is of the default network, not the tiny one.
        fixed = {"spacing_mm": self.spacing_mm, "unseen_sites": 1, "network_preset": "tiny", "dp": False}
        fixed["initial_model"] = "none"
        return RunConfig(**self.run, **fixed, eval_every=self.run["num_rounds"], **sites_and_folders)

    def synthesize(self, data_root: Path, n_sites: int) -> Path:
        """The phantom site folders (built-in head phantom), written once and reused by later runs."""
        from bench.phantom_sites import synthesize_once

        return synthesize_once(
            data_root, n_sites=n_sites, subjects_per_site=self.subjects_per_site, spacing_mm=self.spacing_mm
        )


OVERHEAD = Workload(3, 2.0, dict(num_rounds=4, local_steps=30, patch_size=48, batch_size=2, num_sites=3))
"""The overhead run: realistic local work (the project's default site recipe) on small phantoms; two
training sites and one unseen site."""
SCALE = Workload(2, 4.0, dict(num_rounds=2, local_steps=3, patch_size=32, batch_size=1, test_fraction=0.5))
"""The scale runs: many sites (one unseen), little data and work per site."""


# --- data ---------------------------------------------------------------------------------------------


def first_sites(data_root: Path, n: int, into: Path) -> Path:
    """A data root holding (links to) the first ``n`` site folders of ``data_root``."""
    into.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in data_root.iterdir() if p.is_dir() and not p.name.startswith("."))[:n]:
        link = into / folder.name
        if not link.exists():
            link.symlink_to(folder, target_is_directory=True)
    return into


# --- one run, watched ---------------------------------------------------------------------------------


class RunWatch:
    """Collects a run's events (with wall-clock ``time``) and the array bytes of its messages per round."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.stage = (0, "preparing sites")
        # (round, stage, direction) -> [bytes of each message]
        self.array_bytes: dict[tuple[int, str, str], list[int]] = defaultdict(list)

    def on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if event.get("event") == "round-start":
            self.stage = (int(event["round"]), str(event["stage"]))

    def on_message(self, direction: str, message: Any) -> None:
        if message.has_error():
            return
        size = sum(len(a.data) for record in message.content.array_records.values() for a in record.values())
        self.array_bytes[(*self.stage, direction)].append(size)

    def times(self, kind: str, **match: Any) -> list[float]:
        return [
            e["time"]
            for e in self.events
            if e.get("event") == kind and all(e.get(k) == v for k, v in match.items())
        ]

    def round_wall_s(self, server_round: int) -> float:
        """Send of the round's training messages -> its checkpoint written."""
        (start,) = self.times("round-start", round=server_round, stage="training")
        (end,) = self.times("checkpoint", round=server_round)
        return end - start

    def slowest_site_training_s(self, server_round: int) -> float:
        return max(
            float(e["metrics"]["seconds"])
            for e in self.events
            if e.get("event") == "train" and e["round"] == server_round
        )


def _run(config, watch: RunWatch) -> None:
    from client.app import app as client_app
    from study.simulation import run_simulation

    run_simulation(config, client_app, on_event=watch.on_event, on_message=watch.on_message, progress=False)


def model_bytes(config) -> int:
    """Raw size of the global model's arrays (sum of numel x itemsize)."""
    from server.global_model import initial_state_dict

    return sum(t.numel() * t.element_size() for t in initial_state_dict(config).values())


# --- 1 + 2: overhead and bytes --------------------------------------------------------------------------


def overhead(out: Path, workload: Workload) -> None:
    import shutil

    n_sites = workload.run["num_sites"]
    data_root = workload.synthesize(out / "overhead-data", n_sites)
    run_dir = out / "overhead-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = workload.config(data_root=str(data_root), run_dir=str(run_dir))
    rounds, training_sites = config.num_rounds, config.num_training_sites
    watch = RunWatch()
    print(f"\n== overhead: {json.dumps(asdict(workload))}", flush=True)
    _run(config, watch)

    print(f"\nFederation overhead per round ({training_sites} training sites, {os.cpu_count()} cores):")
    print("| round | round wall s | slowest site training s | overhead s | overhead share |")
    print("|---|---|---|---|---|")
    shares = []
    for r in range(1, rounds):  # the last round also evaluates
        wall, slowest = watch.round_wall_s(r), watch.slowest_site_training_s(r)
        shares.append((wall - slowest) / wall)
        print(f"| {r} | {wall:.2f} | {slowest:.2f} | {wall - slowest:.2f} | {100 * shares[-1]:.1f} % |")
    print(f"mean overhead share {100 * sum(shares) / len(shares):.1f} % (target < 5 %)")

    size = model_bytes(config)
    expected = 2 * size * training_sites
    print(
        f"\nBytes of model arrays per training round (model: {size / 1024:.1f} KiB raw, "
        f"{training_sites} training sites; expected 2 x model x sites = {expected / 1024:.1f} KiB):"
    )
    print("| round | to sites KiB | from sites KiB | total KiB | total / expected |")
    print("|---|---|---|---|---|")
    for r in range(1, rounds + 1):
        down = sum(watch.array_bytes[(r, "training", "to-site")])
        up = sum(watch.array_bytes[(r, "training", "from-site")])
        print(
            f"| {r} | {down / 1024:.1f} | {up / 1024:.1f} | {(down + up) / 1024:.1f} | {(down + up) / expected:.3f} |"
        )
    evaluation = sum(watch.array_bytes[(rounds, "evaluating", "to-site")])
    print(
        f"evaluation after round {rounds}: {evaluation / 1024:.1f} KiB to {n_sites} sites (the global "
        "model; sites reply with scalars only). Serialized arrays carry a small .npy header each."
    )


# --- 3: scale --------------------------------------------------------------------------------------------


def scale_child(n_sites: int, data_root: Path, out: Path, workload: Workload) -> None:
    """One scale run (in its own process); prints one JSON line of its figures."""
    config = workload.config(
        num_sites=n_sites,
        data_root=str(first_sites(data_root, n_sites, out / f"data-{n_sites}")),
        run_dir=str(out / f"run-{n_sites}"),
    )
    rounds = config.num_rounds
    watch = RunWatch()
    started = time.time()
    _run(config, watch)
    (first_training,) = watch.times("round-start", round=1, stage="training")
    (evaluating,) = watch.times("round-start", round=rounds, stage="evaluating")
    (evaluated,) = watch.times("aggregate-evaluate", round=rounds)
    figures = {
        "sites": n_sites,
        "prepare_s": first_training - started,
        "round_s": [watch.round_wall_s(r) for r in range(1, rounds)],
        "evaluation_s": evaluated - evaluating,
        "total_s": time.time() - started,
    }
    print("FIGURES " + json.dumps(figures), flush=True)


def run_sampling_rss(command: list[str]) -> tuple[int, str, int]:
    """Run ``command``; returns its exit status, its output and the peak RSS (bytes) of its process tree."""
    from bench.process_tree import tree_rss_bytes

    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_bytes(child.pid))
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = child.communicate()[0]
    done.set()
    sampler.join()
    return child.returncode, output, peak[0]


def scale(out: Path, site_counts: list[int], workload: Workload) -> None:
    import shutil

    workload.synthesize(out / "scale-data", max(site_counts))
    print(f"\n== scale: {json.dumps(asdict(workload))}", flush=True)
    rows = []
    for n in site_counts:
        shutil.rmtree(out / f"run-{n}", ignore_errors=True)
        status, output, peak = run_sampling_rss(
            [sys.executable, __file__, "--scale-child", str(n), "--out", str(out)]
        )
        figures = next(
            (json.loads(line[8:]) for line in output.splitlines() if line.startswith("FIGURES ")), None
        )
        if status != 0 or figures is None:
            print(f"{n} sites: FAILED (exit {status})\n{output[-3000:]}")
            continue
        figures["peak_rss_gib"] = peak / 2**30
        rows.append(figures)
        print(f"{n} sites done: {json.dumps(figures)}", flush=True)

    print(
        f"\nScale on one machine ({os.cpu_count()} cores; one unseen site; peak RSS of the whole process tree):"
    )
    print(
        "| sites | preparing sites s | training round s | s per training site | evaluation s | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|")
    for f in rows:
        round_s = sum(f["round_s"]) / len(f["round_s"])
        print(
            f"| {f['sites']} | {f['prepare_s']:.1f} | {round_s:.1f} | {round_s / (f['sites'] - 1):.2f} | "
            f"{f['evaluation_s']:.1f} | {f['peak_rss_gib']:.2f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("/tmp/neurofed-bench-federation"), help="work folder"
    )
    parser.add_argument("--sites", default="3,10,20", help="site counts of the scale runs (one unseen each)")
    parser.add_argument("--skip-overhead", action="store_true", help="skip the overhead and bytes run")
    parser.add_argument("--skip-scale", action="store_true", help="skip the scale runs")
    parser.add_argument("--scale-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out.resolve()
    if args.scale_child:
        scale_child(args.scale_child, out / "scale-data", out, SCALE)
        return 0
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_overhead:
        overhead(out, OVERHEAD)
    if not args.skip_scale:
        scale(out, [int(n) for n in args.sites.split(",") if n], SCALE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
