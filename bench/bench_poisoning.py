"""Poisoning: one malicious site among seven, on real anatomy, with FedAvg and Flower's robust strategies.

Data (synthesized once, study/synthesis.py, from ../shared/data/label_maps or --label-maps): 7 training
sites built from maps 01-10 (``--subjects-per-site`` each, one scanner per site) and 1 unseen site of
``--unseen-subjects`` (>= 20) built from maps 11-15 only, the anatomy held out of every training set
(each map used several times, each time with its own deformation and noise; its own scanner). Tissue
protocol, no DP, every run's site secrets derived from its seed (the same splits in every arm of a seed).

Site 7 is malicious. Its attacks (the last two pass every norm rule by construction):

- ``scaled``: its update ``(w_m - w)`` x 100;
- ``sign-flip``: its update negated, ``w - (w_m - w)``;
- ``noise``: ``w`` plus Gaussian noise of the same L2 norm as its honest update (pure noise);
- ``label-flip``: it trains honestly on its own data with the classes permuted (CSF -> GM -> WM -> CSF);
- ``inflated-weight``: its honest update, claiming ``num-examples`` = 1e9.

Every run is `server.federated_run.FederatedRun` (screening on, as in any run: reply schema, norm rules,
capped weights) over an in-process grid of the sites' own ClientApp (bench/in_process_grid.py; no Flower
engine), with ``byzantine-sites`` = 1. Measured: the unseen site's mean tissue Dice of the final global
model (the site's own evaluation of all its subjects), for clean FedAvg and for each (attack, strategy),
over ``--seeds`` seeds; whether an arm's mean lies within the clean FedAvg runs' seed-to-seed spread
(min..max); and how many of the malicious site's replies the screening rejected. Printed, never asserted::

    .venv/bin/python bench/bench_poisoning.py [--out /tmp/neurofed-bench-poisoning] [--seeds 0,1,2]
        [--rounds 4] [--local-steps 10] [--patch-size 24] [--attacks ...] [--strategies ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_HOME", "/tmp/neurofed-bench-flwr-home")
from bench.in_process_grid import InProcessGrid  # noqa: E402
from contract.run_config import ROBUST_STRATEGIES, RunConfig  # noqa: E402

LABEL_MAPS = Path(os.environ.get("NEUROFED_LABEL_MAPS", ROOT.parent / "shared" / "data" / "label_maps"))
TRAINING_SITES, TRAINING_MAPS, UNSEEN_MAPS = 7, range(1, 11), range(11, 16)
MALICIOUS = TRAINING_SITES - 1
"""Index of the malicious site (site-07)."""
ATTACKS = ("scaled", "sign-flip", "noise", "label-flip", "inflated-weight")
STRATEGIES = ("fedavg", *ROBUST_STRATEGIES)
SETTINGS = RunConfig(
    num_rounds=4,
    local_steps=10,
    protocol="tissue",
    dp=False,
    network_preset="tiny",
    initial_model="none",
    patch_size=24,
    batch_size=2,
    learning_rate=2e-3,
    test_fraction=0.25,
    num_sites=TRAINING_SITES + 1,
    unseen_sites=1,
    eval_every=100,
    spacing_mm=3.0,
    byzantine_sites=1,
)
"""Every run's settings but strategy, seed and folders."""


# --- data ---------------------------------------------------------------------------------------------


def _maps_folder(out: Path, numbers: range, label_maps: Path) -> Path:
    folder = out / f"maps-{numbers.start:02d}-{numbers.stop - 1:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        link = folder / f"training_seg_{n:02d}.nii.gz"
        if not link.exists():
            link.symlink_to(label_maps / link.name)
    return folder


def synthesize(out: Path, label_maps: Path, per_site: int, unseen_subjects: int, spacing: float) -> Path:
    """``out/data`` (sites 1-7 from maps 01-10, site 8 from maps 11-15) and ``out/data-label-flip``
    (the same, site 7 with its classes permuted); returns ``out``."""
    from bench.phantom_sites import synthesize_once

    common = {"spacing_mm": spacing, "seed": 0}
    training = synthesize_once(
        out / "training",
        n_sites=TRAINING_SITES,
        subjects_per_site=per_site,
        label_maps_dir=_maps_folder(out, TRAINING_MAPS, label_maps),
        **common,
    )
    # Another seed: the unseen site gets a scanner of its own, not site 1's.
    unseen = synthesize_once(
        out / "unseen",
        n_sites=1,
        subjects_per_site=unseen_subjects,
        label_maps_dir=_maps_folder(out, UNSEEN_MAPS, label_maps),
        **{**common, "seed": 1},
    )
    for name, flip in (("data", False), ("data-label-flip", True)):
        root = out / name
        root.mkdir(exist_ok=True)
        for i in range(TRAINING_SITES):
            site = root / f"site-{i + 1:02d}"
            if flip and i == MALICIOUS:
                if not site.exists():
                    _write_label_flipped(training / f"site-{i + 1:02d}", site)
            elif not site.exists():
                site.symlink_to(training / f"site-{i + 1:02d}", target_is_directory=True)
        if not (root / "site-08").exists():
            (root / "site-08").symlink_to(unseen / "site-01", target_is_directory=True)
    return out


def _write_label_flipped(source: Path, target: Path) -> None:
    """A copy of site ``source`` whose label maps have the tissue classes permuted (CSF -> GM -> WM -> CSF)."""
    import nibabel as nib

    from models.label_protocols import get_protocol

    members = get_protocol("tissue").members  # 1 CSF, 2 GM, 3 WM
    shutil.copytree(source, target)
    for path in target.rglob("*_dseg.nii.gz"):
        image = nib.load(path)
        labels = np.asarray(image.dataobj)
        flipped = labels.copy()
        for cls, values in members.items():
            flipped[np.isin(labels, values)] = members[cls % 3 + 1][0]
        nib.save(nib.Nifti1Image(flipped.astype(labels.dtype), image.affine, image.header), path)


# --- attacks ------------------------------------------------------------------------------------------


def attack_tamper(attack: str, seed: int):
    """The in-process grid's tamper of the malicious site's training reply (None: no tampering)."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    if attack not in ("scaled", "sign-flip", "noise", "inflated-weight"):
        return None
    rng = np.random.default_rng([seed, 7])

    def tamper(site: int, instruction: Message, reply: Message) -> Message:
        if site != MALICIOUS:
            return reply
        sent = instruction.content["arrays"]
        arrays, metrics = reply.content["arrays"], dict(reply.content["metrics"])
        if attack == "inflated-weight":
            metrics["num-examples"] = 10**9
            content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
            return Message(content=content, reply_to=instruction)
        step = {k: arrays[k].numpy().astype(np.float64) - sent[k].numpy() for k in arrays}
        if attack == "scaled":
            step = {k: 100 * v for k, v in step.items()}
        elif attack == "sign-flip":
            step = {k: -v for k, v in step.items()}
        else:
            norm = np.sqrt(sum(float(np.sum(v**2)) for v in step.values()))
            size = sum(v.size for v in step.values())
            step = {k: rng.normal(0, norm / np.sqrt(size), v.shape) for k, v in step.items()}
        new = {k: Array((sent[k].numpy() + step[k]).astype(arrays[k].numpy().dtype)) for k in arrays}
        content = RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=instruction)

    return tamper


# --- runs ---------------------------------------------------------------------------------------------


def run_arm(out: Path, settings: RunConfig, strategy: str, attack: str, seed: int) -> dict:
    """One federated run; returns the unseen site's final Dice, the rejections of the malicious site, and
    the wall time. A finished run of the same settings in ``out`` is read back instead."""
    from server.federated_run import FederatedRun
    from server.run_directory import RunDirectory
    from study.simulation import fix_site_secrets

    data = out / ("data-label-flip" if attack == "label-flip" else "data")
    config = settings.replace(
        strategy=strategy,
        seed=seed,
        data_root=str(data),
        run_dir=str(out / "runs" / f"seed-{seed}" / f"{attack}-{strategy}"),
    )
    run_dir = Path(config.run_dir)
    result_file = run_dir / "bench-result.json"
    if result_file.is_file() and RunDirectory(run_dir).holds_run_of(config):
        return json.loads(result_file.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (out / "cache").mkdir(exist_ok=True)
    (run_dir / "cache").symlink_to(out / "cache", target_is_directory=True)  # one cache for every run
    sites = sorted(p for p in data.iterdir() if p.name.startswith("site-"))
    fix_site_secrets(run_dir, sites, seed)
    started = time.perf_counter()
    grid = InProcessGrid(len(sites), attack_tamper(attack, seed), evaluating={len(sites) - 1})
    FederatedRun(config, grid).execute()
    events = RunDirectory(run_dir).read_events()
    (final,) = [e for e in events if e["event"] == "evaluate" and e["round"] == config.num_rounds]
    rejected = [e for e in events if e["event"] == "rejected" and e["site"] == f"site-{MALICIOUS + 1:02d}"]
    result = {
        "dice": final["metrics"]["dice-mean"],
        "unseen_subjects": final["metrics"]["num-examples"],
        "malicious_rejected": len(rejected),
        "seconds": time.perf_counter() - started,
    }
    result_file.write_text(json.dumps(result))
    return result


def _cell(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "—"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/neurofed-bench-poisoning"), help="work folder")
    parser.add_argument("--label-maps", type=Path, default=LABEL_MAPS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--rounds", type=int, default=SETTINGS.num_rounds)
    parser.add_argument("--local-steps", type=int, default=SETTINGS.local_steps)
    parser.add_argument("--patch-size", type=int, default=SETTINGS.patch_size)
    parser.add_argument("--spacing", type=float, default=SETTINGS.spacing_mm)
    parser.add_argument("--subjects-per-site", type=int, default=3)
    parser.add_argument("--unseen-subjects", type=int, default=20)
    args = parser.parse_args()
    if not args.label_maps.is_dir() or len(list(args.label_maps.glob("training_seg_*.nii.gz"))) < 15:
        print(f"skipped: the 15 label maps training_seg_01..15 are not in {args.label_maps} (--label-maps)")
        return 0
    import torch
    from flwr.supercore.task_identity import TaskIdentity

    torch.set_num_threads(1)  # the sites run one after another; each used one thread in simulation too
    # This process plays the ServerApp's runtime, which names the run its messages belong to.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    seeds = [int(s) for s in args.seeds.split(",")]
    attacks = [a for a in args.attacks.split(",") if a]
    strategies = [s for s in args.strategies.split(",") if s]
    settings = SETTINGS.replace(
        num_rounds=args.rounds,
        local_steps=args.local_steps,
        patch_size=args.patch_size,
        spacing_mm=args.spacing,
    )
    out = args.out.resolve()
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"settings: {json.dumps(settings.to_dict())}", flush=True)
    wall = time.perf_counter()
    synthesize(out, args.label_maps.resolve(), args.subjects_per_site, args.unseen_subjects, args.spacing)
    arms = [("clean", "fedavg"), *((a, s) for a in attacks for s in strategies)]
    results: dict[tuple[str, str], list[dict]] = {}
    for seed in seeds:
        for attack, strategy in arms:
            result = run_arm(out, settings, strategy, attack, seed)
            results.setdefault((attack, strategy), []).append(result)
            print(
                f"seed {seed} {attack:>15} {strategy:>13}: unseen Dice {result['dice']:.3f} "
                f"(malicious replies rejected: {result['malicious_rejected']}/{settings.num_rounds}, "
                f"{result['seconds']:.0f} s)",
                flush=True,
            )
    clean = [r["dice"] for r in results[("clean", "fedavg")]]
    low, high = min(clean), max(clean)
    print(
        f"\nclean FedAvg, unseen-site Dice over seeds {seeds}: {_cell(clean)} (spread {low:.3f}..{high:.3f})"
    )
    print(
        "\nUnseen-site mean tissue Dice, mean ± sd over seeds (✓: mean within the clean FedAvg spread or above;"
    )
    print(
        "r/n: the malicious site's training replies rejected by the screening, over all seeds and rounds):\n"
    )
    print("| strategy | " + " | ".join(attacks) + " |")
    print("|---|" + "---|" * len(attacks))
    for strategy in strategies:
        cells = []
        for attack in attacks:
            runs = results[(attack, strategy)]
            dice = [r["dice"] for r in runs]
            mark = " ✓" if statistics.mean(dice) >= low else ""
            rejected = sum(r["malicious_rejected"] for r in runs)
            cells.append(f"{_cell(dice)}{mark} (r {rejected}/{len(runs) * settings.num_rounds})")
        print(f"| {strategy} | " + " | ".join(cells) + " |")
    subjects = results[("clean", "fedavg")][0]["unseen_subjects"]
    print(
        f"\nunseen site: {subjects} subjects (maps 11-15); total wall time {time.perf_counter() - wall:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
