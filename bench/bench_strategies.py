"""Accuracy of the federated strategies on real anatomy, every arm with the same compute budget.

Four simulated hospitals (one scanner each) are synthesized once from the real FreeSurfer label maps
(../shared/data/label_maps, or --label-maps / $NEUROFED_LABEL_MAPS); sites 1-3 train, site 4 is the
unseen site that never trains. Tissue protocol (CSF, grey matter, white matter; ``--protocol aseg``: the
32 FreeSurfer aseg structures), no DP. With 4 subjects per site the 15 maps give 16 subjects: the unseen
site's last subject reuses the first map (with its own deformation and the unseen site's scanner). Arms:

- FedAvg, FedProx, FedBN (and FedAvgM, FedAdam, FedYogi with ``--arms``; ``fedadam:0.003`` sets the
  server learning rate, ``fedavgm:1:0.7`` the server learning rate and momentum): each a
  `neurofed simulate`-equivalent run (Flower's simulation engine) on
  the same data, seed, network and settings; every site evaluates the global model (and, for FedBN,
  its personalised model: its own normalization layers + the global rest) after every ``eval-every``
  rounds, so the Dice per round shows whether the run converged;
- local-only (one per training site) and pooled: trained once, by the study evaluation of the FedAvg
  run (study/study_evaluation.py), with its budget rule: local-only gets ``rounds x local_steps``
  optimizer steps (what a site ran in the federation), pooled ``rounds x local_steps x 3`` (the
  federation's total).

Scores are mean Dice over the protocol's classes of each test subject, averaged over the test subjects of
a site: the training sites' held-out test splits and all subjects of the unseen site; then each class's
Dice and HD95, pooled against FedAvg. Federated scores are those the sites reported for the final round
(the study evaluation reproduces them exactly; see tests/test_report.py). Figures are printed, never
asserted::

    .venv/bin/python bench/bench_strategies.py [--out /tmp/neurofed-bench-strategies] [--rounds 10]
        [--local-steps 25] [--label-maps DIR] [--reuse] [--arms fedavg,fedprox,fedbn,fedavgm,fedadam:0.003]

``--reuse`` keeps finished arm runs (and the baselines) of an earlier call with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.phantom_sites import synthesize_once  # noqa: E402
from contract.run_config import RunConfig  # noqa: E402

LABEL_MAPS = Path(os.environ.get("NEUROFED_LABEL_MAPS", ROOT.parent / "shared" / "data" / "label_maps"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TRAINING_SITES, UNSEEN_SITES = 3, 1
FEDERATED_ARMS: tuple[str, ...] = ("fedavg", "fedprox", "fedbn")
"""The arms run by default."""
ARM_NAMES: dict[str, str] = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedbn": "FedBN",
    "fedavgm": "FedAvgM",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
}
"""The strategies an arm may use (``--arms``), and how the tables name them."""
BASELINE_ARM = "fedavg"
"""The arm whose study evaluation trains and scores the local-only and pooled models (once)."""


SUBJECTS_PER_SITE = 4
SETTINGS = RunConfig(
    num_rounds=10,
    local_steps=25,
    protocol="tissue",
    dp=False,  # the strategies are compared without DP noise (bench_dp_accuracy.py measures its cost)
    network_preset="tiny",
    initial_model="none",  # random weights: the shipped starting model is the default network at 2 mm
    patch_size=32,
    batch_size=2,
    learning_rate=2e-3,
    proximal_mu=0.01,
    seed=0,
    test_fraction=0.25,
    simulated_min_test_subjects=1,  # 1 test person per training site: synthetic, so its figure may be shown
    num_sites=TRAINING_SITES + UNSEEN_SITES,
    unseen_sites=UNSEEN_SITES,
    eval_every=2,
    spacing_mm=3.0,
)
"""Every arm's run settings but its strategy and folders; printed with the results."""
OPTIONS: tuple[tuple[str, str, str | None], ...] = (
    ("--rounds", "num_rounds", None),
    ("--local-steps", "local_steps", None),
    ("--eval-every", "eval_every", None),
    ("--proximal-mu", "proximal_mu", None),
    ("--spacing", "spacing_mm", "voxel size, mm"),
    ("--patch-size", "patch_size", "training patch edge, voxels"),
    ("--seed", "seed", None),
    ("--protocol", "protocol", "label protocol: tissue (CSF, GM, WM) or aseg (32 structures)"),
    ("--network-preset", "network_preset", "network size: tiny or default (models/networks.py)"),
    ("--architecture", "architecture", "unet (MONAI residual UNet), dynunet or segresnet"),
)
"""The command-line options that change `SETTINGS`: (option, RunConfig setting, help)."""


def _finished_with(run_dir: Path, config) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly ``config``."""
    from server.run_directory import RunDirectory

    try:
        return (run_dir / "final-model.pt").is_file() and RunDirectory(run_dir).holds_run_of(config)
    except Exception:
        return False


def arm_settings(arm: str, settings: RunConfig) -> RunConfig:
    """``settings`` for the arm ``strategy[:server-learning-rate[:server-momentum]]``, e.g. ``fedavgm:1:0.7``."""
    strategy, *server = arm.split(":")
    changes: dict[str, Any] = {"strategy": strategy}
    for name, value in zip(("server_learning_rate", "server_momentum"), server, strict=False):
        changes[name] = float(value)
    return settings.replace(**changes)


def arm_label(arm: str, settings: RunConfig) -> str:
    """How the tables name an arm: the strategy and the settings it alone uses."""
    config = arm_settings(arm, settings)
    name = ARM_NAMES[config.strategy]
    if config.strategy == "fedprox":
        return f"{name} (mu={config.proximal_mu:g})"
    if config.strategy == "fedavgm":
        return f"{name} (server lr {config.server_step_size():g}, momentum {config.server_momentum:g})"
    if config.strategy in ("fedadam", "fedyogi"):
        return f"{name} (server lr {config.server_step_size():g})"
    return name


def run_arm(arm: str, data_root: Path, out: Path, settings: RunConfig, reuse: bool = False):
    """One federated run of ``arm`` (`arm_settings`); returns its RunDirectory (``reuse``: a finished
    identical one)."""
    from client.app import app as client_app
    from server.run_directory import RunDirectory
    from study.simulation import run_simulation

    config = arm_settings(arm, settings).replace(
        data_root=str(data_root), run_dir=str(out / f"run-{arm.replace(':', '-')}")
    )
    run_dir = Path(config.run_dir)
    if reuse and _finished_with(run_dir, config):
        print(f"\n== {arm}: reusing the finished run in {run_dir}", flush=True)
        return RunDirectory(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished or differently configured run of an earlier benchmark
    run_dir.mkdir(parents=True)
    # Every arm preprocesses the same data with the same plan: one cache serves them all.
    shared_cache = out / "cache"
    shared_cache.mkdir(exist_ok=True)
    if not (run_dir / "cache").exists():
        (run_dir / "cache").symlink_to(shared_cache, target_is_directory=True)
    print(f"\n== {arm}: {settings.num_rounds} rounds x {settings.local_steps} local steps", flush=True)
    started = time.perf_counter()
    # Every arm's sites draw the same secrets, hence the same test splits: the arms score the same persons.
    result = run_simulation(config, client_app, site_secrets_seed=config.seed)
    print(f"== {arm} finished in {time.perf_counter() - started:.0f} s", flush=True)
    return result


def dice_per_round(events: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, float]]:
    """``{(site, model): {round: mean Dice}}`` of the sites' evaluations (model ``global``/``personal``)."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for e in events:
        if e.get("event") == "evaluate" and e["metrics"].get("dice-mean") is not None:
            out.setdefault((e["site"], e.get("model", "global")), {})[int(e["round"])] = float(
                e["metrics"]["dice-mean"]
            )
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def print_convergence(arm: str, per_round: dict, trainers: list[str], unseen: list[str]) -> None:
    for model in ("global", "personal"):
        curves = {site: per_round.get((site, model)) for site in trainers + unseen}
        if not all(curves.values()):
            continue
        rounds = sorted(next(iter(curves.values())))
        label = f"{arm} {'personalised' if model == 'personal' else 'global'}"
        print(f"\nDice per round, {label} (mean of the training sites' test splits | unseen site):")
        print("round | train-site mean | " + " | ".join(unseen))
        for r in rounds:
            train = _mean([curves[s][r] for s in trainers])
            print(f"{r:5d} | {train:15.3f} | " + " | ".join(f"{curves[s][r]:.3f}" for s in unseen))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("/tmp/neurofed-bench-strategies"), help="work folder"
    )
    parser.add_argument("--label-maps", type=Path, default=LABEL_MAPS, help="folder of training_seg_*.nii.gz")
    for option, setting, help_text in OPTIONS:
        default = getattr(SETTINGS, setting)
        parser.add_argument(option, dest=setting, type=type(default), default=default, help=help_text)
    parser.add_argument("--subjects-per-site", type=int, default=SUBJECTS_PER_SITE)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse finished arm runs with the same settings (and the FedAvg run's baselines) in --out",
    )
    parser.add_argument(
        "--arms",
        default=",".join(FEDERATED_ARMS),
        help="federated arms, each strategy[:server-lr[:server-momentum]], the strategy one of "
        + ",".join(ARM_NAMES),
    )
    args = parser.parse_args()
    if not args.label_maps.is_dir() or not any(args.label_maps.glob("*.nii*")):
        print(
            f"skipped: no label maps in {args.label_maps}; pass --label-maps DIR or set NEUROFED_LABEL_MAPS "
            "to the folder of the real FreeSurfer label maps (training_seg_*.nii.gz)"
        )
        return 0
    arms = [a for a in args.arms.split(",") if a]
    if BASELINE_ARM not in arms or {a.split(":")[0] for a in arms} - set(ARM_NAMES):
        parser.error(f"--arms must include {BASELINE_ARM} and only name {', '.join(ARM_NAMES)}")
    settings = SETTINGS.replace(**{setting: getattr(args, setting) for _, setting, _ in OPTIONS})
    out = args.out.resolve()
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(
        f"settings: subjects_per_site={args.subjects_per_site} {json.dumps(settings.to_dict())}", flush=True
    )
    wall_started = time.perf_counter()
    data_root = synthesize_once(
        out / "data",
        n_sites=settings.num_sites,
        subjects_per_site=args.subjects_per_site,
        label_maps_dir=args.label_maps.resolve(),
        spacing_mm=settings.spacing_mm,
        seed=settings.seed,
    )

    from client.site_model import build_model

    parameters = sum(p.numel() for p in build_model(settings).parameters())
    print(f"network: {settings.architecture}, {settings.network_preset} preset, {parameters:,} parameters")
    runs = {arm: run_arm(arm, data_root, out, settings, reuse=args.reuse) for arm in arms}

    from study.study_evaluation import evaluate_study

    evaluation_path = runs[BASELINE_ARM].root / "evaluation.json"
    if args.reuse and evaluation_path.is_file():
        print(f"\nreusing the baselines of {evaluation_path}")
    else:
        started = time.perf_counter()
        evaluate_study(runs[BASELINE_ARM].root, data_root, progress=False)
        print(
            f"\nlocal-only and pooled baselines trained and scored in {time.perf_counter() - started:.0f} s"
        )
    evaluation = json.loads(evaluation_path.read_text())

    sites = evaluation["sites"]
    trainers = [s["site"] for s in sites if s["role"] == "train"]
    unseen = [s["site"] for s in sites if s["role"] == "holdout"]
    per_round = {arm: dice_per_round(runs[arm].read_events()) for arm in arms}
    for arm in arms:
        print_convergence(arm, per_round[arm], trainers, unseen)

    def baseline(model: str, site: str) -> float:
        return _mean(
            [r["mean_dice"] for r in evaluation["results"] if r["model"] == model and r["site"] == site]
        )

    def final(arm: str, model: str, site: str) -> float:
        curve = per_round[arm].get((site, model), {})
        return curve[max(curve)] if curve else float("nan")

    rows: list[tuple[str, dict[str, float]]] = [
        ("pooled", {s: baseline("pooled", s) for s in trainers + unseen}),
    ]
    for own in trainers:
        rows.append((f"local-only {own}", {s: baseline(f"local-only:{own}", s) for s in trainers + unseen}))
    rows.append(
        (
            "local-only, each site's own",
            {s: baseline(f"local-only:{s}", s) for s in trainers} | {u: float("nan") for u in unseen},
        )
    )
    for arm in arms:
        label = arm_label(arm, settings)
        rows.append((f"{label} global", {s: final(arm, "global", s) for s in trainers + unseen}))
        if arm == "fedbn":
            rows.append((f"{label} personalised", {s: final(arm, "personal", s) for s in trainers + unseen}))

    budget = evaluation["budget"]
    print(
        f"\nMean Dice over the {settings.protocol} classes after {settings.num_rounds} rounds; same budget for every arm: "
        f"federated {budget['federated_steps_per_site']} steps per site ({budget['federated_steps_total']} in "
        f"all), local-only {budget['local_only_steps']} steps, pooled {budget['pooled_steps']} steps; "
        f"patch {settings.patch_size}^3, batch {settings.batch_size}, {settings.network_preset} network."
    )
    header = [
        "model",
        *[f"{s} test" for s in trainers],
        "train-site mean",
        *[f"{u} (unseen)" for u in unseen],
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, values in rows:
        train_mean = _mean([values[s] for s in trainers])
        cells = [*(values[s] for s in trainers), train_mean, *(values[u] for u in unseen)]
        print("| " + " | ".join([name, *("—" if v != v else f"{v:.3f}" for v in cells)]) + " |")
    pooled = rows[0][1]
    print("\nEach model against pooled training (the same compute), unseen site | training sites' mean:")
    for name, values in rows[1:]:
        ratios = [_mean([values[u] for u in unseen]) / _mean([pooled[u] for u in unseen])]
        ratios.append(_mean([values[s] for s in trainers]) / _mean([pooled[s] for s in trainers]))
        print(f"  {name}: " + " | ".join("—" if r != r else f"{r:.2f}x" for r in ratios))
    chance = _mean([v for s in sites for v in s["chance_mean_dice"].values()])
    tests = {s["site"]: len(s["test_subjects"]) for s in sites}
    print(
        f"test subjects per site: {tests}; chance level (random labels, true proportions) {chance:.3f}. "
        "FedBN personalised on the unseen site is its global model (a site that never trained has no "
        "normalization layers of its own)."
    )
    print_per_structure(evaluation, trainers, unseen)
    print(f"total wall time {time.perf_counter() - wall_started:.0f} s; run folders under {out}")
    return 0


def print_per_structure(evaluation: dict[str, Any], trainers: list[str], unseen: list[str]) -> None:
    """Dice and HD95 of every class of the protocol, pooled against the FedAvg arm's global model (as the
    study evaluation scored them), on the unseen site and on the training sites' test splits."""
    models = {"pooled": "pooled", "federated": ARM_NAMES[BASELINE_ARM]}

    def mean(model: str, sites: list[str], name: str, metric: str) -> float:
        return _mean(
            [
                r["metrics"][name][metric]
                for r in evaluation["results"]
                if r["model"] == model and r["site"] in sites and r["metrics"][name][metric] is not None
            ]
        )

    header = [f"{label} {where}" for where in ("unseen", "training sites") for label in models.values()]
    print(f"\nPer class: Dice (HD95 mm) of the final models, {evaluation['grid']}:")
    print("| class | " + " | ".join(header) + " |")
    print("|" + "---|" * (len(header) + 1))
    for name in evaluation["classes"]:
        cells = [
            f"{mean(model, sites, name, 'dice'):.3f} ({mean(model, sites, name, 'hd95_mm'):.1f})"
            for sites in (unseen, trainers)
            for model in models
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
