"""Benchmark: Dice under DP on an unseen site, from scratch vs from the public starting model, per recipe part.

Real anatomy the starting model never saw (label maps ``training_seg_11`` ... ``15`` of
``../shared/data/label_maps``; maps 01-10 are the shipped starting model's), 3 training sites + 1 unseen
site, one simulated scanner each (study/synthesis.py), synthesized once and reused by every arm; every
site's secret is fixed from ``--seed`` so every arm sees the same splits (`neurofed simulate
--fixed-site-secrets`). Each arm is a federated run (FedAvg; `study.simulation.run_simulation`) whose sites
evaluate the final global model; printed per arm: ε spent per site, mean tissue Dice on the training sites'
test splits and on the unseen site. Beside them, scored on the same subjects: the starting model alone,
each training site's local-only model (the run's steps on its own training split) and the pooled model (the
federation's steps on every training site's split), without DP, from the same starting weights and trainable
layers, as study/study_baselines.py trains them.

Arms (``--arms``, comma-separated groups):

- ``epsilon``: without DP and at each ``--epsilons``, from the starting model and from random weights;
- ``recipe``: at ε = 8 from the starting model, the default recipe (every layer trained, one augmented
  view per person, no weight averaging, the clipping norm from the starting model's public gradient norms,
  learning rate 2e-3) with one part changed at a time;
- ``strategy``: from the starting model, FedAvg and FedAvgM (server momentum 0.5, 0.9), each at ε = 8 and
  without DP;
- ``server-lr``: FedAvg with a server learning rate of 2 and 3 (FedAvgM without momentum), without DP
  and at ε = 8: the federation's parallel compute against pooled training's sequential steps;
  ``dp-server-lr``: at ε = 8 only, server learning rates 1.5, 2 and 3;
- ``rounds``: the same 50 local steps per site as 10 rounds x 5 and 25 rounds x 2, without DP and at ε = 8;
- ``steps``: at ε = 8, batches of 8 and 16 persons, 4 and 20 local steps per round;
- ``diagnostic``: the DP training path with a noise multiplier of 0.001 (no privacy), without clipping and
  with the default clipping: what DP-SGD's noise costs apart from what its path and its clipping cost;
- ``noise``: the ε = 8 arm's noise multiplier divided by 4, 16, 64 and 256 (no privacy guarantee kept):
  the noise on each step's mean that a site with that many times the persons would add at ε = 8 and the
  same sampling rate, so the Dice that realistic site sizes would reach.

Usage::

    .venv/bin/python bench/bench_dp_recipe.py [--arms epsilon,recipe] [--epsilons 1,3,8] [--starts start,scratch] [--seed 0]
        [--out DIR] [--rounds R --local-steps S ...any run setting as --key value]

Figures are printed and kept in ``OUT/bench_dp_recipe.json``, never asserted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_LABEL_MAPS = ROOT.parent / "shared" / "data" / "label_maps"
UNSEEN_ANATOMY = [f"training_seg_{i:02d}.nii.gz" for i in range(11, 16)]
"""Reserved: never part of the shipped starting model's training (BENCHMARKS.md, "Starting model")."""


def reserved_maps(label_maps: Path, folder: Path) -> Path:
    """A folder of links to the reserved label maps only, so synthesis draws no other anatomy."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in UNSEEN_ANATOMY:
        link = folder / name
        if not link.exists():
            link.symlink_to((label_maps / name).resolve())
    return folder


def arms(
    group: str, epsilons: list[float], starts: tuple[str, ...] = ("start", "scratch")
) -> list[tuple[str, dict]]:
    """``(name, run-setting changes)`` of each arm of ``group``."""
    if group == "epsilon":
        out = []
        for start, initial in (("start", {}), ("scratch", {"initial_model": "none"})):
            if start not in starts:
                continue
            out.append((f"no DP, {start}", {"dp": False, **initial}))
            out += [
                (f"DP ε={e:g}, {start}", {"dp": True, "dp_target_epsilon": e, **initial}) for e in epsilons
            ]
        return out
    if group == "recipe":
        return [
            (DP_REFERENCE_ARM, {"dp": True}),
            ("DP ε=8, norm layers only", {"dp": True, "trainable_layers": "norm"}),
            ("DP ε=8, norm layers + head", {"dp": True, "trainable_layers": "norm+head"}),
            ("DP ε=8, multiplicity 4", {"dp": True, "dp_augmentation_multiplicity": 4}),
            ("DP ε=8, EMA 0.9", {"dp": True, "ema_decay": 0.9}),
            ("DP ε=8, clip 1.0", {"dp": True, "dp_max_grad_norm": 1.0}),
            ("DP ε=8, lr 5e-4", {"dp": True, "learning_rate": 5e-4}),
            ("DP ε=8, lr 5e-3", {"dp": True, "learning_rate": 5e-3}),
        ]
    if group == "strategy":
        # The server's optimizer at ε = 8 and without DP (issue 15: the federated recipe, DP beside no DP).
        # FedAvg last: it is the "epsilon" group's "no DP, start" and "DP ε=8, start" again.
        servers = [
            ("FedAvgM lr 1 momentum 0.9", {"strategy": "fedavgm", "server_momentum": 0.9}),
            ("FedAvgM lr 1 momentum 0.5", {"strategy": "fedavgm", "server_momentum": 0.5}),
            ("FedAvg", {"strategy": "fedavg"}),
        ]
        return [
            (f"{privacy}, {name}", {"dp": dp, **server})
            for name, server in servers
            for privacy, dp in (("DP ε=8", True), ("no DP", False))
        ]
    if group in ("server-lr", "dp-server-lr", "no-dp-server-lr"):
        # FedAvg's global step is the mean of the sites' steps: where the sites agree, a server learning rate
        # of up to the number of sites turns their parallel compute into as much progress as pooled training;
        # under DP the mean of the sites' noise is smaller than one site's, which leaves room for the step.
        # Without DP a step of 2 overshoots ("server-lr"): "no-dp-server-lr" tries the shorter ones.
        rates, privacies = (2.0, 3.0), (("no DP", False), ("DP ε=8", True))
        if group == "dp-server-lr":
            rates, privacies = (1.5, 2.0, 3.0), (("DP ε=8", True),)
        if group == "no-dp-server-lr":
            rates, privacies = (1.25, 1.5), (("no DP", False),)
        return [
            (
                f"{privacy}, server lr {lr:g}",
                {"dp": dp, "strategy": "fedavgm", "server_learning_rate": lr, "server_momentum": 0.0},
            )
            for lr in rates
            for privacy, dp in privacies
        ]
    if group == "rounds":
        # The same 50 steps per site in more, shorter rounds: the sites drift apart less between averages.
        schedules = [(10, 5), (25, 2)]
        return [
            (
                f"{privacy}, {rounds} rounds x {steps} local steps",
                {"dp": dp, "num_rounds": rounds, "local_steps": steps, "eval_every": rounds},
            )
            for rounds, steps in schedules
            for privacy, dp in (("no DP", False), ("DP ε=8", True))
        ]
    if group == "steps":
        # At ε = 8: fewer and larger noisy steps (De et al., 2022), or more and smaller ones.
        return [
            ("DP ε=8, batch 8", {"dp": True, "batch_size": 8}),
            ("DP ε=8, batch 16 (every person, every step)", {"dp": True, "batch_size": 16}),
            ("DP ε=8, 4 local steps", {"dp": True, "local_steps": 4}),
            ("DP ε=8, 20 local steps", {"dp": True, "local_steps": 20}),
            ("DP ε=8, batch 8, lr 5e-3", {"dp": True, "batch_size": 8, "learning_rate": 5e-3}),
        ]
    if group == "diagnostic":
        # The private training path with (almost) no noise: what its sampling and per-person steps cost
        # without clipping, then with the default clipping; "no DP, start" and "DP ε=8, start" beside them.
        # The noise's std is multiplier x clipping norm, so without clipping (norm 1e4) the multiplier is
        # 1e-7: about the same negligible noise as 1e-3 at the default norm (1.14).
        # The sites' ledgers get a `DIAGNOSTIC_BUDGET` first (`run_arm`), or they would refuse such an ε.
        return [
            (
                "DP path, no noise, no clipping",
                {"dp": True, "dp_noise_multiplier": 1e-7, "dp_max_grad_norm": 1e4},
            ),
            ("DP path, no noise, default clipping", {"dp": True, "dp_noise_multiplier": 1e-3}),
        ]
    if group == "noise":
        # At the same sampling rate and ε the noise multiplier is the same for any site size, and the noise's
        # std on the mean of a step's clipped gradients is multiplier x norm / (persons x rate): dividing
        # the multiplier by k is a site with k times the persons, as far as the noise goes.
        return [(DP_REFERENCE_ARM, {"dp": True})] + [
            (f"DP ε=8 noise / {k} (as {k}x the persons)", {"dp": True, NOISE_DIVISOR: k})
            for k in NOISE_DIVISORS
        ]
    raise SystemExit(
        f"unknown arm group {group!r}: choose epsilon, recipe, strategy, server-lr, dp-server-lr, no-dp-server-lr, rounds, steps, diagnostic, noise"
    )


DP_REFERENCE_ARM = "DP ε=8, start"
"""The app's default DP run (the "epsilon" group's arm at ε = 8 from the starting model)."""
NOISE_DIVISOR = "noise_divisor"
"""An arm's change that is not a run setting: divide `DP_REFERENCE_ARM`'s noise multiplier by it."""
NOISE_DIVISORS = (4, 16, 64, 256)


DIAGNOSTIC_BUDGET = (1e300, 1e-3)
"""Lifetime (ε, δ) of the simulated sites' ledgers in a diagnostic arm (one that fixes the noise
multiplier below what ε = 8 needs): no privacy at all, which only a benchmark may ask of a simulated site."""


def noise_multiplier(run_dir: Path) -> float | None:
    """The noise multiplier the sites of a finished run trained with (None without DP)."""
    from server.run_directory import RunDirectory

    used = {
        e["metrics"].get("noise-multiplier")
        for e in RunDirectory(run_dir).read_events()
        if e.get("event") == "train"
    }
    used.discard(None)
    if len(used) > 1:
        raise SystemExit(f"{run_dir}: the sites trained with several noise multipliers {sorted(used)}")
    return used.pop() if used else None


def give_sites_budget(config, budget: tuple[float, float]) -> None:
    """Set up each simulated site's ledger in the run's folder with ``budget`` before the run starts."""
    from client.site_setup import LEDGER_FILE
    from contract.run_layout import SITE_STATE_DIR, site_folders
    from privacy.privacy_ledger import PrivacyLedger

    for folder in site_folders(Path(config.data_root)):
        ledger = PrivacyLedger(Path(config.run_dir) / SITE_STATE_DIR / folder.name / LEDGER_FILE)
        ledger.path.parent.mkdir(parents=True, exist_ok=True)
        ledger.set_budget(*budget)


def run_arm(name: str, config, secrets_seed: int) -> dict:
    """One federated run; Dice of its final model as the sites scored it, ε per site."""
    from client.app import app as client_app
    from study.simulation import run_simulation

    started = time.perf_counter()
    if config.dp and config.dp_noise_multiplier > 0:  # only diagnostic arms fix the noise multiplier
        give_sites_budget(config, DIAGNOSTIC_BUDGET)
    run_dir = run_simulation(config, client_app, progress=False, site_secrets_seed=secrets_seed)
    events = run_dir.read_events()
    epsilon = {e["site"]: float(e["epsilon"]) for e in events if e.get("event") == "train" and "epsilon" in e}
    final = [
        e
        for e in events
        if e.get("event") == "evaluate"
        and e["round"] == config.num_rounds
        and e.get("model", "global") == "global"
    ]
    train = [e["metrics"]["dice-mean"] for e in final if e["role"] == "train"]
    unseen = [e["metrics"]["dice-mean"] for e in final if e["role"] == "holdout"]
    return {
        "arm": name,
        "seconds": round(time.perf_counter() - started, 1),
        "epsilon": epsilon,
        "dice_train_sites": sum(train) / len(train),
        "dice_unseen": sum(unseen) / len(unseen),
        "clipping": run_dir.read_document().get("dp_clipping"),
        "run_dir": str(run_dir.root),
    }


def reference_scores(run_dir: Path, data_root: Path, config, have: set[str]) -> list[dict]:
    """The starting model alone, each local-only model and the pooled model (all without DP), scored on the
    run's test subjects; the rows named in ``have`` are skipped (a resumed bench)."""
    import numpy as np

    from contract.wire import ROLE_HOLDOUT, ROLE_TRAIN
    from models.label_protocols import get_protocol
    from server.run_directory import RunDirectory
    from study.study_baselines import budget_rule, starting_network, train_baseline
    from study.study_evaluation import _score
    from study.study_sites import load_study_sites

    document = RunDirectory(run_dir).read_document()
    sites = load_study_sites(run_dir, data_root, config, document["sites"], progress=False)
    trainers = [s for s in sites if s.role == ROLE_TRAIN]
    names = get_protocol(config.protocol).class_names
    budget = budget_rule(config.num_rounds, config.local_steps, len(trainers))

    def scores(model) -> dict:
        per_role: dict[str, list[float]] = {ROLE_TRAIN: [], ROLE_HOLDOUT: []}
        for site in sites:
            for _, image, label in site.test:
                *_, s = _score(model, image, label, config, names, (config.spacing_mm,) * 3)
                per_role[site.role].append(float(np.mean([v["dice"] for v in s.values()])))
        return {
            "dice_train_sites": float(np.mean(per_role[ROLE_TRAIN])),
            "dice_unseen": float(np.mean(per_role[ROLE_HOLDOUT])),
        }

    out = []
    if STARTING_ROW not in have:
        out.append({"arm": STARTING_ROW, **scores(starting_network(config))})
    for site in trainers:
        name = f"local-only {site.site_id} (no DP)"
        if name not in have:
            model, _ = train_baseline(config, site.train, budget["local_only_steps"], f"local-{site.site_id}")
            out.append({"arm": name, **scores(model)})
    pooled = [subject for site in trainers for subject in site.train]
    if POOLED_ROW not in have:
        model, _ = train_baseline(config, pooled, budget["pooled_steps"], "pooled")
        out.append({"arm": POOLED_ROW, **scores(model)})
    if POOLED_DP_ROW not in have:
        model, epsilon = pooled_private(
            config, pooled, budget["pooled_steps"], document["dp_clipping"]["norm"]
        )
        out.append({"arm": POOLED_DP_ROW, "epsilon": {"pooled": epsilon}, **scores(model)})
    return out


def pooled_private(config, subjects, steps: int, clipping_norm: float):
    """The pooled model under person-level DP at ``config``'s target ε and δ and the run's resolved
    ``clipping_norm``: central DP over every training site's persons (one unit each), the federation's steps,
    its expected batch of persons per step. Returns the model and the ε spent."""
    import torch

    from client.private_round import PersonPatches
    from client.site_model import run_training_config
    from models.trainable import freeze_except
    from models.training import make_loss, make_optimizer, training_step
    from privacy.dp_sgd import DPConfig, PrivacyUnitDataset, make_private_training
    from study.study_baselines import starting_network

    model = starting_network(config)
    freeze_except(model, config.trainable_layers)
    training = run_training_config(config)
    dp = DPConfig(target_epsilon=config.dp_target_epsilon, max_grad_norm=clipping_norm, delta=config.dp_delta)
    persons = [[(image, label)] for _, image, label in subjects]
    units = PrivacyUnitDataset(PersonPatches(persons, training, steps, config.seed), len(persons))
    with make_private_training(
        model,
        make_optimizer(model, training),
        units,
        config.batch_size,
        dp,
        loss_fn=make_loss(),
        planned_steps=steps,
        generator=torch.Generator().manual_seed(config.seed),
    ) as private:
        private.run_steps(steps, step_fn=training_step)
        epsilon = private.spent_epsilon()
    return model, epsilon


STARTING_ROW = "starting model alone"
POOLED_ROW = "pooled (no DP, every training site's persons, the federation's steps)"
POOLED_DP_ROW = "pooled, DP ε=8 (central: every training site's persons, the federation's steps)"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--label-maps", type=Path, default=DEFAULT_LABEL_MAPS)
    parser.add_argument("--arms", default="epsilon,recipe")
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument(
        "--starts", default="start,scratch", help="epsilon arms from the starting model and/or random weights"
    )
    parser.add_argument("--seed", type=int, default=0, help="synthesis, splits (site secrets), DP noise")
    parser.add_argument(
        "--out", type=Path, default=None, help="keep data and runs here (default: a temp dir)"
    )
    parser.add_argument(
        "--no-references", action="store_true", help="skip the starting-model, local-only and pooled rows"
    )
    args, extra = parser.parse_known_args()
    if not all((args.label_maps / n).is_file() for n in UNSEEN_ANATOMY):
        print(
            f"skipped: the reserved label maps {UNSEEN_ANATOMY[0]}..{UNSEEN_ANATOMY[-1]} are not in {args.label_maps}"
        )
        return 0

    from contract.run_config import RunConfig
    from study.run_options import add_run_config_options, given_settings
    from study.simulated_run import synthesize_run_data

    settings_parser = argparse.ArgumentParser()
    add_run_config_options(settings_parser, exclude=("data_root", "run_dir"))
    given = given_settings(settings_parser.parse_args(extra))
    out = args.out or Path(tempfile.mkdtemp(prefix="neurofed-bench-dp-recipe-"))
    out.mkdir(parents=True, exist_ok=True)
    data_root = out / "data"
    base = RunConfig(**{"seed": args.seed, **given}, data_root=str(data_root.resolve()))
    base = base.replace(eval_every=base.num_rounds)
    print("command: " + shlex.join([sys.executable, *sys.argv]), flush=True)
    print(f"settings: {json.dumps(base.to_flower())}", flush=True)
    if not data_root.is_dir():
        synthesize_run_data(
            base, data_root, label_maps_dir=reserved_maps(args.label_maps, out / "maps"), progress=False
        )

    epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    results_path = out / "bench_dp_recipe.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {r["arm"] for r in results}
    for group in args.arms.split(","):
        for name, changes in arms(group.strip(), epsilons, tuple(args.starts.split(","))):
            if name in done:
                continue
            slug = "".join(c if c.isalnum() else "-" for c in name)
            if NOISE_DIVISOR in changes:
                reference = next(r for r in results if r["arm"] == DP_REFERENCE_ARM)
                divisor = changes.pop(NOISE_DIVISOR)
                changes["dp_noise_multiplier"] = noise_multiplier(Path(reference["run_dir"])) / divisor
            config = base.replace(**changes, run_dir=str((out / "runs" / slug).resolve()))
            result = run_arm(name, config, args.seed)
            print(
                f"{name}: unseen {result['dice_unseen']:.3f}, training sites {result['dice_train_sites']:.3f}, "
                f"ε {max(result['epsilon'].values(), default=0):.2f}, {result['seconds']:.0f} s",
                flush=True,
            )
            results.append(result)
            done.add(name)
            results_path.write_text(json.dumps(results, indent=1))
    if not args.no_references:
        first = Path(results[0]["run_dir"])
        first_config = RunConfig.from_dict(json.loads((first / "config.json").read_text())["run_config"])
        for reference in reference_scores(first, data_root, first_config, {r["arm"] for r in results}):
            print(
                f"{reference['arm']}: unseen {reference['dice_unseen']:.3f}, training sites {reference['dice_train_sites']:.3f}",
                flush=True,
            )
            results.append(reference)
        results_path.write_text(json.dumps(results, indent=1))

    print("\n| arm | ε per site | Dice, training sites' test splits | Dice, unseen site |\n|---|---|---|---|")
    for r in results:
        eps = r.get("epsilon") or {}
        shown = f"{max(eps.values()):.2f}" if eps else "—"
        print(f"| {r['arm']} | {shown} | {r['dice_train_sites']:.3f} | {r['dice_unseen']:.3f} |")
    print(f"\nresults: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
