"""`neurofed`: the coordinator and researcher command line.

Each sub-command imports what it needs inside its handler: torch, MONAI and Opacus take seconds to
import, and `neurofed --help` must answer at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.errors import NeurofedError


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a simulated multi-site BIDS dataset (one folder per site, one scanner per site)",
        description=(
            "Synthesize brain MRI for N simulated hospitals. Each site is one simulated scanner with its "
            "own tissue contrast, bias field, Rician noise level, slice thickness and field of view; each "
            "subject gets its own smooth deformation. Anatomy comes from FreeSurfer-style label maps "
            "(--label-maps) or, without them, from a built-in procedural head phantom. Each site folder "
            "is a BIDS dataset: sub-*/anat/sub-*_<contrast>.nii.gz (T1w, T2w or PDw, the site's weighting), "
            "derivatives/labels/sub-*/anat/sub-*_dseg.nii.gz (FreeSurfer label values) and "
            "sub-*_desc-brain_mask.nii.gz beside it, plus site.json recording the scanner profile and seed. "
            "Each site is written to a temporary folder and renamed into place when complete."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    p.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from client.synthesis import synthesize_sites

    synthesize_sites(
        args.out_dir,
        n_sites=args.sites,
        subjects_per_site=args.subjects_per_site,
        label_maps_dir=args.label_maps,
        spacing_mm=args.spacing,
        seed=args.seed,
        overwrite=args.overwrite,
        contrasts=args.contrasts,
    )
    return 0


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from server.run_config import RunConfig  # light: no torch, Flower or MONAI

    d = RunConfig()
    p = sub.add_parser(
        "simulate",
        help="run a whole federation on this machine (Flower simulation) and write a run directory",
        description=(
            "Simulate a federation of N hospitals on this machine with Flower's simulation engine: each "
            "site prepares its own data, trains the shared network locally and sends back only model "
            "weights and aggregate metrics. The last --unseen sites never train; every site holds out a "
            "test split. Without --data-root, data is synthesized into RUN_DIR/data (built-in head "
            "phantom, or --label-maps). Writes RUN_DIR/config.json, checkpoints/round-XXX.pt, "
            "metrics.jsonl (per site, per round) and final-model.pt. --resume RUN_DIR continues an "
            "interrupted run from its last checkpoint with its stored settings."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/simulate"), help="run directory to write")
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (its stored settings are used; --rounds may extend it)",
    )
    p.add_argument("--sites", type=int, default=d.num_sites, help="number of sites, unseen ones included")
    p.add_argument(
        "--unseen",
        type=int,
        default=d.unseen_sites,
        help="sites that never train (evaluated as unseen sites)",
    )
    p.add_argument("--rounds", type=int, default=None, help=f"federated rounds (default {d.num_rounds})")
    p.add_argument(
        "--strategy",
        default=d.strategy,
        choices=["fedavg", "fedprox", "fedadam", "fedyogi", "fedbn"],
        help="aggregation strategy (fedbn: normalization layers stay at the sites)",
    )
    p.add_argument(
        "--local-steps", type=int, default=d.local_steps, help="optimizer steps per site per round"
    )
    p.add_argument("--preset", default=d.network_preset, choices=["tiny", "default"], help="network size")
    p.add_argument("--proximal-mu", type=float, default=d.proximal_mu, help="FedProx proximal weight")
    p.add_argument(
        "--server-lr",
        type=float,
        default=d.server_learning_rate,
        help="server learning rate (fedadam, fedyogi)",
    )
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="sites' learning rate")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="patches per step")
    p.add_argument("--patch-size", type=int, default=d.patch_size, help="cubic training patch edge, voxels")
    p.add_argument(
        "--test-fraction", type=float, default=d.test_fraction, help="share of each site's subjects held out"
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="evaluate every K rounds (and after the last); the run's report is rebuilt after each",
    )
    p.add_argument("--protocol", default=d.protocol, help="label protocol (tissue or aseg)")
    p.add_argument(
        "--seed", type=int, default=d.seed, help="seed of data synthesis, splits, initialisation, training"
    )
    p.add_argument("--data-root", type=Path, default=None, help="existing folder of site folders to use")
    p.add_argument("--label-maps", type=Path, default=None, help="FreeSurfer label maps as synthesis anatomy")
    p.add_argument("--subjects-per-site", type=int, default=6, help="subjects synthesized per site")
    p.add_argument(
        "--spacing", type=float, default=d.spacing_mm, help="voxel size in mm (synthesis and preprocessing)"
    )
    p.add_argument(
        "--fov", default="", help="preprocessing field of view in mm, 'X,Y,Z' (default: a whole adult head)"
    )
    p.add_argument(
        "--dp",
        action=argparse.BooleanOptionalAction,
        default=d.dp,
        help="subject-level DP-SGD at every training site, on by default (--no-dp turns it off; the report "
        "then says so in its first lines); each site checks its privacy ledger every round (simulated sites "
        "get a ledger in RUN_DIR/sites/<site>/ with a lifetime budget of ε=100, δ=1e-3)",
    )
    p.add_argument(
        "--target-epsilon",
        type=float,
        default=d.dp_target_epsilon,
        help="with --dp: ε each site may spend on the whole run (at --delta)",
    )
    p.add_argument(
        "--noise-multiplier",
        type=float,
        default=d.dp_noise_multiplier,
        help="with --dp: noise std / clipping norm; > 0 replaces --target-epsilon",
    )
    p.add_argument("--delta", type=float, default=d.dp_delta, help="with --dp: δ of each site's guarantee")
    p.add_argument(
        "--max-grad-norm", type=float, default=d.dp_max_grad_norm, help="with --dp: per-subject clipping norm"
    )
    p.add_argument(
        "--server-dp",
        default=d.server_dp,
        choices=["off", "fixed", "adaptive"],
        help="site-level DP at the coordinator (Flower's server-side clipping wrapper)",
    )
    p.add_argument(
        "--server-dp-noise",
        type=float,
        default=d.server_dp_noise_multiplier,
        help="with --server-dp: noise multiplier of the aggregate",
    )
    p.add_argument(
        "--server-dp-clip",
        type=float,
        default=d.server_dp_clipping_norm,
        help="with --server-dp: clipping norm of a site's update (adaptive: the initial one)",
    )
    p.add_argument("--verbose", action="store_true", help="show Flower's log")
    p.set_defaults(handler=_run_simulate)


def _run_simulate(args: argparse.Namespace) -> int:
    from server.run_config import RunConfig
    from server.run_directory import RunDirectory
    from server.simulation import run_simulation

    if args.resume is not None:
        stored = RunDirectory(args.resume).read_config()
        config = stored.replace(run_dir=str(args.resume), num_rounds=args.rounds or stored.num_rounds)
    else:
        out = args.out
        RunDirectory(out).check_new()
        data_root = args.data_root if args.data_root is not None else out / "data"
        config = RunConfig(
            num_rounds=args.rounds or RunConfig().num_rounds,
            strategy=args.strategy,
            proximal_mu=args.proximal_mu,
            server_learning_rate=args.server_lr,
            local_steps=args.local_steps,
            protocol=args.protocol,
            network_preset=args.preset,
            patch_size=args.patch_size,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            test_fraction=args.test_fraction,
            num_sites=args.sites,
            unseen_sites=args.unseen,
            eval_every=args.eval_every,
            data_root=str(data_root.resolve()),
            run_dir=str(out.resolve()),
            spacing_mm=args.spacing,
            field_of_view_mm=args.fov,
            dp=args.dp,
            dp_target_epsilon=args.target_epsilon,
            dp_noise_multiplier=args.noise_multiplier,
            dp_delta=args.delta,
            dp_max_grad_norm=args.max_grad_norm,
            server_dp=args.server_dp,
            server_dp_noise_multiplier=args.server_dp_noise,
            server_dp_clipping_norm=args.server_dp_clip,
        )
        if args.data_root is None and not data_root.is_dir():
            from client.synthesis import synthesize_sites

            print(f"synthesizing {args.sites} sites x {args.subjects_per_site} subjects into {data_root}")
            synthesize_sites(
                data_root,
                n_sites=args.sites,
                subjects_per_site=args.subjects_per_site,
                label_maps_dir=args.label_maps,
                spacing_mm=args.spacing,
                seed=args.seed,
            )
    # The sites' ClientApp: this CLI is the composition root that joins coordinator and site code.
    from client.app import app as client_app

    run_dir = run_simulation(config, client_app, resume=args.resume is not None, verbose=args.verbose)
    _print_summary(run_dir)
    # A resumed run may have added rounds: its evaluation is always rebuilt.
    _evaluate_and_report(run_dir.root, data_root=None, evaluate=True)
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


def _evaluate_and_report(run_dir: Path, data_root: Path | None, evaluate: bool) -> None:
    """Build evaluation.json (when asked) with the sites' data, then render the report from the run files."""
    from server.report import write_report

    if evaluate:
        # The study evaluation needs every site's data; in a simulation it is all on this machine.
        from client.study_evaluation import evaluate_study

        print(f"evaluating federated, local-only and pooled models on every site of {run_dir}")
        print(f"evaluation: {evaluate_study(run_dir, data_root)}")
    markdown, page = write_report(run_dir)
    print(f"report: {page} (and {markdown.name})")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="(re)build the cross-site evaluation and report of a federated run",
        description=(
            "Write RUN_DIR/report.md and RUN_DIR/report.html: run settings, per-site Dice/HD95/ASSD of the "
            "federated, local-only and pooled models, the train-site x test-site generalization matrix, "
            "Wilcoxon signed-rank tests federated vs local-only, unseen-site results, per-round plots and "
            "QC images. The comparison (RUN_DIR/evaluation.json, RUN_DIR/baselines/, RUN_DIR/qc/) needs "
            "the sites' data and is built when missing or with --re-evaluate."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run directory")
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder of the run's site folders (default: the data root stored in the run's config)",
    )
    p.add_argument("--re-evaluate", action="store_true", help="rebuild evaluation.json even when it exists")
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from server.run_directory import RunDirectory

    RunDirectory(args.run_dir).read_document()  # names the folder when it holds no run
    missing = not (args.run_dir / "evaluation.json").is_file()
    _evaluate_and_report(args.run_dir, args.data_root, evaluate=missing or args.re_evaluate)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model centrally on one site (local-only) or several sites pooled",
        description=(
            "Train the segmentation network on the data of one site (the local-only baseline) or of "
            "several sites pooled (the pooled baseline), with the same network and step budget as a "
            "federated run. Each DATA_DIR is validated and preprocessed (cached between runs); a share of "
            "every site's subjects is held out for validation, scored every --validate-every steps. "
            "Writes a self-describing model file (weights, label protocol, preprocessing plan, network, "
            "provenance)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data_dirs", type=Path, nargs="+", metavar="DATA_DIR", help="site data folder(s)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL.pt", help="model file to write")
    p.add_argument("--protocol", default="tissue", help="label protocol: tissue (4 classes) or aseg (33)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps in total")
    p.add_argument("--seed", type=int, default=0, help="seed of split, initial weights, sampling")
    p.add_argument("--preset", default="default", choices=["tiny", "default"], help="network size")
    p.add_argument("--patch-size", type=int, default=96, help="cubic training patch edge in voxels")
    p.add_argument("--batch-size", type=int, default=2, help="patches per optimizer step")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam step size")
    p.add_argument("--spacing", type=float, default=2.0, help="preprocessing voxel size in mm (isotropic)")
    p.add_argument("--validation-fraction", type=float, default=0.25, help="share of subjects held out")
    p.add_argument("--validate-every", type=int, default=100, help="steps between validation passes")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="preprocessed cache (default $NEUROFED_CACHE_DIR or ~/.cache)",
    )
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import torch

    from client.local_training import LocalTrainingSetup, load_sites, train_centralised, training_provenance
    from client.preprocessed_cache import PreprocessedCache
    from client.preprocessing import PreprocessingPlan
    from models.label_protocols import get_protocol
    from models.model_file import save_model
    from models.networks import NetworkConfig
    from models.training import TrainingConfig

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
    torch.manual_seed(args.seed)
    model, history = train_centralised(sites, protocol, plan, network, training, setup, progress=True)
    provenance = training_provenance(sites, setup, history)
    provenance["training_config"] = training.to_dict()
    save_model(
        args.output,
        model.state_dict(),
        network=network,
        protocol=protocol,
        plan=plan.to_dict(),
        training=provenance,
    )
    final = provenance["final_validation_mean_dice"]
    print(f"wrote {args.output} ({provenance['kind']}, {args.steps} steps, validation mean Dice {final})")
    return 0


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment scans with a trained model (native-space label map, volumes, QC image)",
        description=(
            "Segment one scan, several scans, or every NIfTI file in a folder. For each input writes the "
            "label map in the input's native space (same shape and affine; *_dseg.nii.gz), a volumes table "
            "in mL per structure (*_volumes.csv and *_volumes.json) and a QC image with axial, coronal "
            "and sagittal slices and the label overlay (*_qc.png). Inputs are validated first; a bad input "
            "is reported and skipped. Exits 1 if any input failed."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "inputs", type=Path, nargs="+", metavar="INPUT", help="NIfTI scan(s) or folder(s) of scans"
    )
    p.add_argument(
        "--model", type=Path, required=True, help="model file written by `neurofed train` or a run"
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="for one input file: the label map to write (OUT_dseg.nii.gz); otherwise a folder",
    )
    p.set_defaults(handler=_run_segment)


def _run_segment(args: argparse.Namespace) -> int:
    from client.segmentation import segment_inputs

    written, failed = segment_inputs(args.model, args.inputs, args.output)
    for out in written:
        print(f"{out.source} -> {out.label_map} (volumes: {out.volumes_csv.name}, QC: {out.qc_png.name})")
    for source, reason in failed:
        print(f"FAILED {source}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def _add_coordinator(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "coordinator",
        help="run the federation's coordinator (Flower SuperLink) and manage which sites may join",
        description=(
            "The coordinator is Flower's SuperLink with TLS and SuperNode authentication on: only sites whose "
            "public key was enrolled may join. `start` runs it in the foreground (as systemd does); `enroll`, "
            "`sites` and `revoke` manage the enrolled sites of a running coordinator. Everything it keeps "
            "(database, run directories, audit log) is in --state-dir."
        ),
    )
    commands = p.add_subparsers(dest="coordinator_command", metavar="ACTION", required=True)

    start = commands.add_parser(
        "start",
        help="run the SuperLink in the foreground (TLS, SuperNode authentication, no runtime installs)",
        description=(
            "Run Flower's SuperLink as the coordinator: one TLS port for the sites (Fleet API) and for "
            "`neurofed run` / enrolment (Control API); SuperNode authentication on; runtime installation of "
            "app dependencies off (the installed neurofed runs, offline); Flower's telemetry off unless "
            "--telemetry. The TLS files are checked first (present, matching, signed by --ca-cert, in date). "
            "Stop it with SIGTERM (systemctl stop); its state survives a restart, and an interrupted run "
            "continues with `neurofed run --resume NAME`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_state_dir(start)
    start.add_argument(
        "--address",
        default="127.0.0.1:9091",
        help="HOST:PORT to listen on. Flower serves its unauthenticated Control API (enrolment, runs) on the "
        "same port as the sites' Fleet API: keep it on loopback and let sites in through the proxy of "
        "deploy/nginx, which passes only /v1/fleet/ (deploy/README.md)",
    )
    start.add_argument("--ca-cert", type=Path, required=True, help="the federation's CA certificate (PEM)")
    start.add_argument(
        "--cert", type=Path, required=True, help="the coordinator's certificate (PEM), naming its host names"
    )
    start.add_argument("--key", type=Path, required=True, help="the coordinator's private key (PEM)")
    start.add_argument("--telemetry", action="store_true", help="allow Flower's anonymous usage telemetry")
    start.set_defaults(handler=_run_coordinator_start)

    enroll = commands.add_parser(
        "enroll",
        help="allow a site to join: register its SuperNode public key under a name",
        description=(
            "Register a site's SuperNode public key (the site.pub from `neurofed-site keygen`) with the running "
            "coordinator, under NAME. Only enrolled keys may connect. Recorded in STATE_DIR/sites.json and "
            "the audit log."
        ),
    )
    enroll.add_argument("public_key", type=Path, metavar="SITE_PUBKEY", help="the site's public key file")
    enroll.add_argument("--name", required=True, help="the site's name, e.g. hospital-a")
    _add_state_dir(enroll)
    enroll.set_defaults(handler=_run_coordinator_enroll)

    sites = commands.add_parser(
        "sites",
        help="list enrolled sites and whether their SuperNode is online",
        description="List the enrolled sites: name, Flower node id, status (registered, online, offline).",
    )
    _add_state_dir(sites)
    sites.set_defaults(handler=_run_coordinator_sites)

    revoke = commands.add_parser(
        "revoke",
        help="stop a site from joining: unregister its SuperNode",
        description=(
            "Unregister the site's SuperNode at the coordinator: it is disconnected and can no longer join "
            "(to readmit it, enroll a new key). Recorded in the audit log."
        ),
    )
    revoke.add_argument("name", metavar="NAME", help="the site's enrolled name")
    _add_state_dir(revoke)
    revoke.set_defaults(handler=_run_coordinator_revoke)


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        help="the coordinator's state directory (database, sites.json, audit.jsonl, runs/)",
    )


def _run_coordinator_start(args: argparse.Namespace) -> int:
    from server.coordinator import TlsFiles, start_coordinator

    start_coordinator(
        args.state_dir, TlsFiles(args.ca_cert, args.cert, args.key), args.address, args.telemetry
    )
    return 0  # not reached: the process became the SuperLink


def _run_coordinator_enroll(args: argparse.Namespace) -> int:
    from server.coordinator_state import CoordinatorState
    from server.site_registry import SiteRegistry

    site = SiteRegistry(CoordinatorState(args.state_dir)).enroll(args.public_key, args.name)
    print(f"enrolled {site.name} (node {site.node_id}); the site can now start with its private key")
    return 0


def _run_coordinator_sites(args: argparse.Namespace) -> int:
    from server.coordinator_state import CoordinatorState
    from server.site_registry import SiteRegistry

    sites = SiteRegistry(CoordinatorState(args.state_dir)).sites()
    if not sites:
        print("no site is enrolled; enroll one with `neurofed coordinator enroll SITE_PUBKEY --name NAME`")
    for s in sites:
        print(f"{s.name:<24} node {s.node_id:<22} {s.status:<16} enrolled {s.enrolled_at}")
    return 0


def _run_coordinator_revoke(args: argparse.Namespace) -> int:
    from server.coordinator_state import CoordinatorState
    from server.site_registry import SiteRegistry

    site = SiteRegistry(CoordinatorState(args.state_dir)).revoke(args.name)
    print(f"revoked {site.name} (node {site.node_id}); it can no longer join")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="submit a federated run to the coordinator and follow it until it ends",
        description=(
            "Submit the neurofed Flower app to the coordinator (`flwr run` over TLS) with the run settings of "
            "pyproject.toml [tool.flwr.app.config], overridden by CONFIG.toml and --set key=value; stream its "
            "log; exit 0 only when the run completed (1 when it failed or was stopped). The run directory is "
            "written on the coordinator, in STATE_DIR/runs/NAME (NAME: the UTC start time unless "
            "--set run-dir=runs/NAME); a run interrupted by a coordinator restart continues from its last "
            "checkpoint with --resume NAME."
        ),
    )
    p.add_argument("config", type=Path, nargs="?", metavar="CONFIG.toml", help="TOML file of run settings")
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run setting (repeatable), e.g. --set num-server-rounds=10 --set strategy=fedprox",
    )
    p.add_argument("--resume", metavar="NAME", help="continue the interrupted run in STATE_DIR/runs/NAME")
    p.add_argument(
        "--state-dir",
        type=Path,
        help="the coordinator's state directory (on the coordinator machine: address and CA from there)",
    )
    p.add_argument(
        "--coordinator", metavar="HOST:PORT", help="the coordinator's address (instead of --state-dir)"
    )
    p.add_argument("--ca", type=Path, help="the federation's CA certificate (with --coordinator)")
    p.add_argument(
        "--app", type=Path, help="the neurofed source folder to submit (default: this installation's)"
    )
    p.add_argument("--no-stream", action="store_true", help="do not print the run's log, only how it ended")
    p.set_defaults(handler=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from server.coordinator_state import Connection, CoordinatorState
    from server.job_submission import default_app_dir, report_outcome, run_settings, submit_run

    if args.coordinator or args.ca:
        if not (args.coordinator and args.ca):
            raise NeurofedError("--coordinator and --ca go together (or pass --state-dir on the coordinator)")
        connection = Connection(args.coordinator, args.ca)
    elif args.state_dir:
        connection = CoordinatorState(args.state_dir).read_connection()
    else:
        raise NeurofedError(
            "say where the coordinator is: --state-dir DIR, or --coordinator HOST:PORT --ca CA.crt"
        )
    settings = run_settings(args.config, args.settings, resume=args.resume)
    app_dir = args.app or default_app_dir()
    outcome = submit_run(connection, settings, app_dir, stream=not args.no_stream)
    return report_outcome(outcome)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurofed",
        description=(
            "neurofed coordinator and researcher tools: synthesize multi-site data, train and evaluate "
            "3D brain segmentation models, and run federated studies. Run `neurofed COMMAND --help` "
            "for the options of a command."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_synth(sub)
    _add_train(sub)
    _add_segment(sub)
    _add_simulate(sub)
    _add_report(sub)
    _add_coordinator(sub)
    _add_run(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except NeurofedError as exc:
        print(f"neurofed {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
