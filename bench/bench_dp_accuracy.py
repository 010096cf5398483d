"""Benchmark: what subject-level DP-SGD costs in Dice, and what it buys against membership inference.

On real anatomy (the FreeSurfer label maps of ``../shared/data/label_maps``, or ``--label-maps``): 3
training sites + 1 unseen site, one simulated scanner each, tissue protocol, synthesized once and reused by
every arm. Arms: no DP, and DP-SGD at a target ε of 1, 3 and 8 per site for the whole run (δ = 1e-5 per
site); every arm has the same rounds, local steps, network, learning rate and seed. Each arm is a
federated run (`study.simulation.run_simulation`, FedAvg); the sites evaluate the global model once,
after the last round. The local-only and pooled baselines are left out: they do not depend on DP.

Printed per arm: ε each site spent (from the sites' ``train`` events, i.e. their privacy ledgers), mean
Dice of the final global model on the training sites' test splits and on the unseen site, and the
membership-inference audit of the final model (study/membership_audit.py): loss-threshold AUC of each
site's members vs its own test subjects pooled over the training sites, and the calibrated attack (TPR,
FPR on the sites' own non-members at a threshold giving <= 10 % false positives on the unseen site).
Figures are printed, never asserted. Usage::

    .venv/bin/python bench/bench_dp_accuracy.py [--label-maps DIR] [--rounds 5] [--local-steps 30]
        [--epsilons 1,3,8] [--out DIR]

Anatomy: 4 sites x 4 subjects would need 16 maps; with 15 the last subject of the unseen site would reuse
the first map (a training subject's anatomy) and is removed before any arm runs, so the unseen site never
shares anatomy with a member.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_LABEL_MAPS = ROOT.parent / "shared" / "data" / "label_maps"
SITES, UNSEEN, SUBJECTS_PER_SITE = 4, 1, 4
DELTA = 1e-5


def synthesize(data_root: Path, label_maps: Path, seed: int, spacing_mm: float) -> list[str]:
    """Write the sites once; remove unseen-site subjects whose anatomy a training site already has.

    Returns the removed subjects (``site/subject``)."""
    import nibabel as nib  # noqa: F401  (fail early if the environment lacks it)

    from study.synthesis import synthesize_sites

    maps = sorted(label_maps.glob("*.nii*"))
    synthesize_sites(
        data_root,
        n_sites=SITES,
        subjects_per_site=SUBJECTS_PER_SITE,
        label_maps_dir=label_maps,
        spacing_mm=spacing_mm,
        seed=seed,
    )
    # Site s subject k uses map (s*K + k) mod M (study.synthesis): a wrapped index repeats a map.
    removed = []
    unseen = sorted(p for p in data_root.iterdir() if p.is_dir())[-1]
    subjects = sorted(p for p in unseen.iterdir() if p.is_dir() and p.name.startswith("sub-"))
    for k, subject in enumerate(subjects):
        if (SITES - 1) * SUBJECTS_PER_SITE + k >= len(maps):
            shutil.rmtree(subject)
            for derived in (unseen / "derivatives").glob(f"*/{subject.name}"):
                shutil.rmtree(derived)
            removed.append(f"{unseen.name}/{subject.name}")
    return removed


def run_arm(name: str, config, data_root: Path, seed_cache: Path | None) -> dict:
    """One federated run and the audit of its final model."""
    from client.app import app as client_app
    from models.model_file import load_model
    from study.simulation import run_simulation
    from study.study_evaluation import audit_final_model, load_study_sites

    run_path = Path(config.run_dir)
    if seed_cache is not None and seed_cache.is_dir():
        # Preprocessing does not depend on the arm: reuse the first arm's cache.
        shutil.copytree(seed_cache, run_path / "cache")
    started = time.perf_counter()
    run_dir = run_simulation(config, client_app, progress=False)
    seconds = time.perf_counter() - started
    events = run_dir.read_events()
    document = run_dir.read_document()
    roles = {s["site"]: s["role"] for s in document["sites"]}
    epsilon = {}
    for e in events:
        if e.get("event") == "train" and "epsilon" in e:
            epsilon[e["site"]] = float(e["epsilon"])  # cumulative: the last round's is the run's
    final_dice = {
        e["site"]: float(e["metrics"]["dice-mean"])
        for e in events
        if e.get("event") == "evaluate"
        and e["round"] == config.num_rounds
        and e.get("model", "global") == "global"
    }
    sites = load_study_sites(run_path, data_root, config, document["sites"])
    audit = audit_final_model(load_model(run_dir.final_model_path).model, sites, config)
    pooled = audit.pooled if audit.pooled is not None else audit.sites[0]
    train_dice = [d for s, d in final_dice.items() if roles[s] == "train"]
    unseen_dice = [d for s, d in final_dice.items() if roles[s] == "holdout"]
    return {
        "arm": name,
        "seconds": seconds,
        "epsilon": epsilon,
        "dice_train_sites": sum(train_dice) / len(train_dice),
        "dice_unseen": sum(unseen_dice) / len(unseen_dice),
        "dice_per_site": final_dice,
        "audit": audit.to_dict(),
        "auc_pooled": pooled.auc,
        "auc_per_site": {s.name: s.auc for s in audit.sites},
        "calibrated": pooled.calibrated.to_dict() if pooled.calibrated is not None else None,
        "n_members": pooled.n_members,
        "n_nonmembers": pooled.n_nonmembers,
        "n_reference": len(audit.reference_losses),
    }


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_table(results: list[dict]) -> None:
    header = (
        "| arm | ε spent per site (δ=1e-5) | Dice train sites (test) | Dice unseen | "
        "MIA AUC pooled (per site) | calibrated TPR / FPR (adv.) | AUC members vs unseen | wall s |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for r in results:
        eps = ", ".join(f"{s} {v:.2f}" for s, v in sorted(r["epsilon"].items())) or "no DP"
        per_site = ", ".join(_fmt(v, 2) for _, v in sorted(r["auc_per_site"].items()))
        cal = r["calibrated"]
        cal_text = (
            f"{cal['tpr']:.2f} / {cal['fpr']:.2f} ({cal['advantage']:+.2f})" if cal is not None else "n/a"
        )
        print(
            f"| {r['arm']} | {eps} | {r['dice_train_sites']:.3f} | {r['dice_unseen']:.3f} | "
            f"{_fmt(r['auc_pooled'], 2)} ({per_site}) | {cal_text} | "
            f"{_fmt(cal['auc_members_vs_reference'] if cal else None, 2)} | {r['seconds']:.0f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--label-maps", type=Path, default=DEFAULT_LABEL_MAPS, help="folder of *.nii.gz maps")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds (every arm)")
    parser.add_argument("--local-steps", type=int, default=30, help="local steps per round (every arm)")
    parser.add_argument("--epsilons", default="1,3,8", help="target ε of the DP arms, comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="seed of synthesis, splits and training")
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm")
    parser.add_argument(
        "--out", type=Path, default=None, help="keep data and runs here (default: a temp dir)"
    )
    args = parser.parse_args()

    if not any(args.label_maps.glob("*.nii*")):
        print(
            f"skipped: no label maps (*.nii.gz) in {args.label_maps}; pass --label-maps DIR "
            "(the real FreeSurfer maps, ../shared/data/label_maps)"
        )
        return 0
    epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    out = args.out or Path(tempfile.mkdtemp(prefix="neurofed-bench-dp-accuracy-"))
    if args.out is not None and out.exists() and any(out.iterdir()):
        print(f"error: --out {out} is not empty; choose a new folder", file=sys.stderr)
        return 2

    from contract.run_config import RunConfig

    base = RunConfig(
        num_rounds=args.rounds,
        local_steps=args.local_steps,
        num_sites=SITES,
        unseen_sites=UNSEEN,
        protocol="tissue",
        seed=args.seed,
        spacing_mm=args.spacing,
        eval_every=args.rounds,  # only the final model's Dice is reported
        data_root=str((out / "data").resolve()),
        dp_delta=DELTA,
    )
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(
        f"settings: {SITES} sites ({UNSEEN} unseen) x {SUBJECTS_PER_SITE} subjects, real anatomy from "
        f"{args.label_maps}; {base.strategy}, {base.num_rounds} rounds x {base.local_steps} local steps, "
        f"network {base.network_preset}, patch {base.patch_size}^3, batch {base.batch_size}, lr "
        f"{base.learning_rate}, test fraction {base.test_fraction}, {base.spacing_mm} mm, seed {base.seed}; "
        f"DP: clip {base.dp_max_grad_norm}, δ = {DELTA}, {base.dp_grad_sample_mode}; out {out}",
        flush=True,
    )
    started = time.perf_counter()
    removed = synthesize(out / "data", args.label_maps, args.seed, args.spacing)
    print(
        f"synthesized in {time.perf_counter() - started:.0f} s; removed (anatomy reused): {removed or 'none'}"
    )

    arms = [("no DP", base.replace(dp=False, run_dir=str((out / "run-nodp").resolve())))]
    arms += [
        (
            f"DP ε={e:g}",
            base.replace(dp=True, dp_target_epsilon=e, run_dir=str((out / f"run-dp{e:g}").resolve())),
        )
        for e in epsilons
    ]
    results = []
    first_cache = None
    for name, config in arms:
        result = run_arm(name, config, out / "data", first_cache)
        first_cache = first_cache or Path(config.run_dir) / "cache"
        print(
            f"{name}: {result['seconds']:.0f} s, Dice train {result['dice_train_sites']:.3f}, unseen "
            f"{result['dice_unseen']:.3f}, MIA AUC {_fmt(result['auc_pooled'], 2)}",
            flush=True,
        )
        results.append(result)
        # Kept after every arm, so a long run that stops early still leaves its finished arms.
        (out / "bench_dp_accuracy.json").write_text(json.dumps(results, indent=1))
    n = results[0]
    print(
        f"\nmembership groups: {n['n_members']} members, {n['n_nonmembers']} non-members over the training "
        f"sites, {n['n_reference']} unseen-site reference subjects; total {time.perf_counter() - started:.0f} s\n"
    )
    print_table(results)
    print(f"\nresults: {out / 'bench_dp_accuracy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
