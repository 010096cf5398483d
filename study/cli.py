"""`neurofed`: the researcher's and the coordinator operator's command line.

The composition root of the house: the researcher's commands (`synth`, `train`, `simulate`, `report`)
join site code (client/), coordinator code (server/) and the study stage; `segment` is the site's own
command (`neurofed-site segment`), and `coordinator` / `run` are server/cli.py's.

Each sub-command imports what it needs inside its handler: torch, MONAI and Opacus take seconds to
import, and `neurofed --help` must answer at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.cli import add_segment_command
from common.command_line import add_command, command_parser, run_command
from contract.run_layout import EVALUATION_FILE
from models.errors import NeurofedError
from server.cli import add_coordinator_commands


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "synth", _run_synth, defaults_in_help=True)
    p.add_argument("out_dir", type=Path, help="output folder; one sub-folder per site (site-01, ...)")
    p.add_argument("--sites", type=int, default=4, help="number of simulated sites (scanners)")
    p.add_argument("--subjects-per-site", type=int, default=6, help="subjects written per site")
    p.add_argument(
        "--label-maps",
        type=Path,
        default=None,
        help="folder of FreeSurfer-style label maps (*.nii[.gz]) to use as anatomy; "
        "default: the built-in procedural head phantom",
    )
    p.add_argument(
        "--contrasts",
        default="T1w",
        help="comma-separated weightings given to sites 1, 2, ... in turn (T1w, T2w, PDw), e.g. T1w,T2w,PDw; "
        "the default makes every site T1w",
    )
    p.add_argument("--spacing", type=float, default=2.0, help="output voxel size in mm (isotropic)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same data")
    p.add_argument("--overwrite", action="store_true", help="replace existing site folders in OUT_DIR")


def _run_synth(args: argparse.Namespace) -> int:
    """Write a simulated multi-site BIDS dataset (one folder per site, one scanner per site).

    Synthesize brain MRI for N simulated hospitals. Each site is one simulated scanner with its
    own tissue contrast, bias field, Rician noise level, slice thickness and field of view; each
    subject gets its own smooth deformation. Anatomy comes from FreeSurfer-style label maps
    (--label-maps) or, without them, from a built-in procedural head phantom. Each site folder
    is a BIDS dataset: sub-*/anat/sub-*_<contrast>.nii.gz (T1w, T2w or PDw, the site's weighting),
    derivatives/labels/sub-*/anat/sub-*_dseg.nii.gz (FreeSurfer label values) and
    sub-*_desc-brain_mask.nii.gz beside it, plus site.json recording the scanner profile and seed.
    Each site is written to a temporary folder and renamed into place when complete.
    """
    from study.synthesis import synthesize_sites

    folders = synthesize_sites(
        args.out_dir,
        n_sites=args.sites,
        subjects_per_site=args.subjects_per_site,
        label_maps_dir=args.label_maps,
        spacing_mm=args.spacing,
        seed=args.seed,
        overwrite=args.overwrite,
        contrasts=args.contrasts,
    )
    for folder in folders:
        print(f"wrote {folder} ({args.subjects_per_site} subjects; `neurofed-site check {folder}` validates it)")
    return 0


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from study.run_options import add_run_config_options  # light: no torch, Flower or MONAI

    p = add_command(sub, "simulate", _run_simulate)
    p.add_argument("--out", type=Path, default=Path("runs/simulate"), help="run directory to write")
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (its stored settings are used; --rounds may extend it)",
    )
    p.add_argument(
        "--data-root",
        dest="data_folder",
        metavar="DATA_ROOT",
        type=Path,
        default=None,
        help="existing folder of site folders to use",
    )
    p.add_argument("--label-maps", type=Path, default=None, help="FreeSurfer label maps as synthesis anatomy")
    p.add_argument("--verbose", action="store_true", help="show Flower's log")
    p.add_argument(
        "--fixed-site-secrets",
        type=int,
        metavar="SEED",
        help="derive every site's secret from SEED so the run repeats exactly (splits, DP noise); for "
        "benchmarks only: whoever knows SEED can replay the noise (default: each site's own random secret)",
    )
    p.add_argument(
        "--compare-without-dp",
        action="store_true",
        help="after a DP run, train the same configuration without DP (RUN_DIR/without-dp, same sites and "
        "splits) and show it beside the DP model in the report: what DP costs",
    )
    p.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        default=None,
        help="run the sites on this existing Ray cluster (its head's address, or auto) instead of a private "
        "Ray on this machine; every node needs this neurofed installed and the data and run folders at the "
        "same paths (deploy/README.md: Simulations on a Ray cluster)",
    )
    add_run_config_options(p, exclude=("data_root", "run_dir"))


def _simulation_config(args: argparse.Namespace):
    """The run's RunConfig: the stored one when resuming, else the options given (synthesizing data)."""
    from contract.run_config import RunConfig
    from server.run_directory import RunDirectory
    from study.run_options import given_settings
    from study.simulated_run import default_data_root, synthesize_run_data

    given = given_settings(args)
    if args.resume is not None:
        stored = RunDirectory(args.resume).read_config()
        return stored.replace(run_dir=str(args.resume), num_rounds=given.get("num_rounds", stored.num_rounds))
    out = args.out
    RunDirectory(out).check_new()
    data_root = args.data_folder if args.data_folder is not None else default_data_root(out)
    config = RunConfig(**given, data_root=str(data_root.resolve()), run_dir=str(out.resolve()))
    if args.data_folder is None and not data_root.is_dir():
        synthesize_run_data(config, data_root, label_maps_dir=args.label_maps)
    return config


def _run_simulate(args: argparse.Namespace) -> int:
    """Run a whole federation on this machine (Flower simulation) and write a run directory.

    Simulate a federation of N hospitals on this machine with Flower's simulation engine: each
    site prepares its own data, trains the shared network locally and sends back only model
    weights and aggregate metrics. The last --unseen sites never train; every site holds out a
    test split. Without --data-root, data is synthesized into RUN_DIR/data (built-in head
    phantom, or --label-maps). Writes RUN_DIR/config.json, checkpoints/round-XXX.pt,
    metrics.jsonl (per site, per round) and final-model.pt. --resume RUN_DIR continues an
    interrupted run from its last checkpoint with its stored settings. Every run setting is an
    option (its Flower key, e.g. --local-steps; a few have short names, e.g. --sites); simulated
    sites get a ledger in RUN_DIR/sites/<site>/ with a lifetime budget of ε=100, δ=1e-3.
    """
    from client.app import app as client_app
    from study.simulation import run_simulation

    config = _simulation_config(args)
    run_dir = run_simulation(
        config,
        client_app,
        resume=args.resume is not None,
        verbose=args.verbose,
        site_secrets_seed=args.fixed_site_secrets,
        ray_address=args.ray_address,
    )
    from study.simulated_run import evaluate_and_report

    _print_summary(run_dir)
    stored = run_dir.read_config()
    if args.compare_without_dp and stored.dp:
        from study.comparison_arm import run_without_dp_arm

        print("training the same configuration without DP, for comparison", flush=True)
        run_without_dp_arm(stored, client_app, ray_address=args.ray_address)
    # A resumed run may have added rounds: its evaluation is always rebuilt.
    evaluate_and_report(run_dir.root)
    return 0


def _print_summary(run_dir) -> None:
    final: dict[str, dict] = {}
    for event in run_dir.read_events():
        if event.get("event") == "evaluate":
            final[(event["site"], event.get("model", "global"))] = event
    print(f"run directory: {run_dir.root}")
    for (site, model), event in sorted(final.items()):
        dice = event["metrics"].get("dice-mean")
        shown = "n/a" if dice is None else f"{dice:.3f}"
        print(f"  {site:<12} {event['role']:<8} {model:<8} mean Dice {shown} (round {event['round']})")
    print(f"metrics: {run_dir.metrics_path}")
    print(f"final model: {run_dir.final_model_path}")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "report", _run_report, defaults_in_help=True)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run directory")
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder of the run's site folders (default: the data root stored in the run's config)",
    )
    p.add_argument("--re-evaluate", action="store_true", help="rebuild evaluation.json even when it exists")


def _run_report(args: argparse.Namespace) -> int:
    """(re)build the cross-site evaluation and report of a federated run.

    Write RUN_DIR/report.md and RUN_DIR/report.html: run settings, per-site Dice/HD95/ASSD of the
    federated, local-only and pooled models, the train-site x test-site generalization matrix,
    Wilcoxon signed-rank tests federated vs local-only, unseen-site results, per-round plots and
    QC images. The comparison (RUN_DIR/evaluation.json, RUN_DIR/baselines/, RUN_DIR/qc/) needs
    the sites' data and is built when missing or with --re-evaluate.
    """
    from server.run_directory import RunDirectory
    from study.simulated_run import evaluate_and_report

    RunDirectory(args.run_dir).read_document()  # names the folder when it holds no run
    missing = not (args.run_dir / EVALUATION_FILE).is_file()
    evaluate_and_report(args.run_dir, args.data_root, evaluate=missing or args.re_evaluate)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from contract.run_config import RunConfig
    from models.postprocessing import POSTPROCESSING_MODES

    p = add_command(sub, "train", _run_train, defaults_in_help=True)
    p.add_argument("data_dirs", type=Path, nargs="+", metavar="DATA_DIR", help="site data folder(s)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL.pt", help="model file to write")
    p.add_argument("--protocol", default="tissue", help="label protocol: tissue (4 classes) or aseg (33)")
    run = RunConfig()  # the defaults of a federated run, so a baseline trains what a federation trains
    p.add_argument("--steps", type=int, default=300, help="optimizer steps in total")
    p.add_argument("--seed", type=int, default=0, help="seed of split, initial weights, sampling")
    p.add_argument("--preset", default=run.network_preset, choices=["tiny", "default"], help="network size")
    p.add_argument("--patch-size", type=int, default=run.patch_size, help="cubic training patch edge in voxels")
    p.add_argument("--batch-size", type=int, default=run.batch_size, help="patches per optimizer step")
    p.add_argument("--learning-rate", type=float, default=run.learning_rate, help="Adam step size")
    p.add_argument(
        "--spacing", type=float, default=run.spacing_mm, help="preprocessing voxel size in mm (isotropic)"
    )
    p.add_argument(
        "--initial-model",
        default=run.initial_model,
        metavar="builtin|none|PATH",
        help="weights to start from: the built-in public starting model, random weights, or a model file",
    )
    p.add_argument(
        "--postprocessing",
        default=run.postprocessing,
        choices=POSTPROCESSING_MODES,
        help="label-map post-processing in validation, recorded in the model file for `neurofed segment`",
    )
    p.add_argument("--validation-fraction", type=float, default=0.25, help="share of subjects held out")
    p.add_argument("--validate-every", type=int, default=100, help="steps between validation passes")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="preprocessed cache (default $NEUROFED_CACHE_DIR or ~/.cache)",
    )


def _run_train(args: argparse.Namespace) -> int:
    """Train a model centrally on one site (local-only) or several sites pooled.

    Train the segmentation network on the data of one site (the local-only baseline) or of
    several sites pooled (the pooled baseline), with the same network and step budget as a
    federated run. Each DATA_DIR is validated and preprocessed (cached between runs); a share of
    every site's subjects is held out for validation, scored every --validate-every steps.
    Writes a self-describing model file (weights, label protocol, preprocessing plan, network,
    provenance).
    """
    import torch

    from client.preprocessed_cache import PreprocessedCache
    from client.preprocessing import PreprocessingPlan
    from models.label_protocols import get_protocol
    from models.model_file import save_model
    from models.networks import NetworkConfig
    from models.starting_model import load_starting_model
    from models.training import TrainingConfig
    from study.local_training import LocalTrainingSetup, load_sites, train_centralised, training_provenance

    try:
        protocol = get_protocol(args.protocol)
    except KeyError as exc:
        raise NeurofedError(str(exc.args[0])) from None
    if args.output.parent and not args.output.parent.exists():
        raise NeurofedError(f"-o {args.output}: folder {args.output.parent} does not exist")
    setup = LocalTrainingSetup(
        steps=args.steps,
        validation_fraction=args.validation_fraction,
        validate_every=args.validate_every,
        seed=args.seed,
        postprocessing=args.postprocessing,
    )
    plan = PreprocessingPlan(target_spacing_mm=(args.spacing,) * 3)
    network = NetworkConfig.preset(args.preset, len(plan.input_contrasts), protocol.num_classes)
    training = TrainingConfig.for_protocol(
        protocol,
        patch_size=(args.patch_size,) * 3,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    network.check_patch_size(training.patch_size)
    cache = PreprocessedCache(args.cache_dir) if args.cache_dir else PreprocessedCache()
    sites = load_sites(
        args.data_dirs,
        plan,
        protocol,
        validation_fraction=setup.validation_fraction,
        seed=args.seed,
        cache=cache,
    )
    starting = load_starting_model(args.initial_model)
    if starting is not None:
        starting.check_fits(network.to_dict(), protocol.name, plan.to_dict())
    torch.manual_seed(args.seed)
    model, history = train_centralised(
        sites,
        protocol,
        plan,
        network,
        training,
        setup,
        initial_state=dict(starting.state_dict) if starting is not None else None,
        progress=True,
    )
    provenance = training_provenance(sites, setup, history)
    provenance["starting_model"] = starting.describe() if starting is not None else None
    provenance["training_config"] = training.to_dict()
    save_model(
        args.output,
        model.state_dict(),
        network=network,
        protocol=protocol,
        plan=plan.to_dict(),
        training=provenance,
        postprocessing=setup.postprocessing,
    )
    final = provenance["final_validation_mean_dice"]
    print(f"wrote {args.output} ({provenance['kind']}, {args.steps} steps, validation mean Dice {final})")
    return 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "pretrain", _run_pretrain, defaults_in_help=True)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL.pt", help="model file to write")
    p.add_argument(
        "--label-maps",
        type=Path,
        nargs="+",
        default=[],
        metavar="PATH",
        help="public FreeSurfer label maps (*.nii.gz files, or folders of them) to add to the built-in phantoms",
    )
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="patches per step")
    p.add_argument("--learning-rate", type=float, default=2e-3, help="Adam's peak step size (cosine decay)")
    p.add_argument("--workers", type=int, default=1, help="processes generating subjects (0: in process)")
    p.add_argument("--phantoms", type=int, default=24, help="distinct built-in phantom anatomies")
    p.add_argument("--validate-every", type=int, default=500, help="steps between scores on held-out subjects")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, phantoms and every random draw")
    p.add_argument("--network-preset", default=None, help="network preset (default: the run default's)")
    p.add_argument("--spacing-mm", type=float, default=None, help="working voxel size (default: the run's)")


def _run_pretrain(args: argparse.Namespace) -> int:
    """Train a public starting model on domain-randomized images of public anatomy only.

    Train the run's network (the defaults of `neurofed simulate`, or --network-preset / --spacing-mm)
    on images generated on the fly from public anatomy: the built-in head phantom always, plus
    every label map in each --label-maps folder. Every generated subject has a random contrast
    (T1-, T2-, PD-, FLAIR-like or arbitrary), bias field, gamma, noise, resolution, slice
    thickness, field of view and deformation, and some are skull-stripped or cropped, so the model
    learns anatomy rather than one scanner. No site's data is used: the model file records ε = 0
    for every site, the generator's settings and the content hash of every label map it saw, and
    can start any federation of the same configuration (--initial-model MODEL.pt).
    """
    from contract.run_config import RunConfig
    from study.pretraining import PretrainingSetup, pretrain

    changes = {}
    if args.network_preset is not None:
        changes["network_preset"] = args.network_preset
    if args.spacing_mm is not None:
        changes["spacing_mm"] = args.spacing_mm
    run = RunConfig(**changes)
    setup = PretrainingSetup(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        workers=args.workers,
        phantoms=args.phantoms,
        validate_every=args.validate_every,
        seed=args.seed,
    )
    provenance = pretrain(args.output, args.label_maps, setup, run)
    last = provenance["validation"][-1]
    print(
        f"wrote {args.output}: {setup.steps} steps in {provenance['seconds'] / 60:.1f} min, held-out "
        f"randomized subjects mean Dice {last['dice']:.3f} (before training {provenance['validation'][0]['dice']:.3f})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    return command_parser(
        "neurofed",
        "neurofed coordinator and researcher tools: synthesize multi-site data, train and evaluate "
        "3D brain segmentation models, and run federated studies. Run `neurofed COMMAND --help` "
        "for the options of a command.",
        [
            _add_synth,
            _add_pretrain,
            _add_train,
            add_segment_command,
            _add_simulate,
            _add_report,
            add_coordinator_commands,
        ],
    )


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, (NeurofedError,))


if __name__ == "__main__":
    sys.exit(main())
