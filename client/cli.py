"""`neurofed-site`: the site daemon command line, run by hospital research IT.

Each sub-command imports what it needs inside its handler so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.command_line import add_command, command_parser, run_command
from models.errors import NeurofedError


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "check", _run_check, defaults_in_help=True)
    p.add_argument("data_dir", type=Path, help="the site's data folder")
    p.add_argument(
        "--protocol",
        default="tissue",
        help="label protocol the labels must fit (tissue: 4 tissue classes; aseg: 32 FreeSurfer structures)",
    )
    p.add_argument("--contrast", default="T1w", help="the structural image the network reads (BIDS suffix)")
    p.add_argument(
        "--unlabelled-ok",
        action="store_true",
        help="accept subjects without a label map (inference-only sites); by default a label is required",
    )
    p.add_argument(
        "--derivatives",
        metavar="NAME",
        help="BIDS: read labels and masks only from derivatives/NAME/ (when several pipelines write *_dseg)",
    )
    p.add_argument(
        "--label-desc",
        metavar="DESC",
        help="BIDS: use only label maps with this desc- entity (e.g. aseg for sub-01_desc-aseg_dseg.nii.gz)",
    )


def _run_check(args: argparse.Namespace) -> int:
    """Validate a site's data folder and print one line per subject.

    Validate every subject in DATA_DIR (BIDS: sub-*/[ses-*/]anat/*_T1w.nii[.gz], labels in
    derivatives/<name>/sub-*/[ses-*/]anat/*_dseg.nii[.gz]; or flat: images/ and labels/ with
    matching file names) and print a table of subject, status and reason. Nothing in DATA_DIR
    is modified. Exits 0 if at least one subject is usable, 1 if none is.
    """
    from client.site_check import run_site_check

    return run_site_check(
        args.data_dir,
        protocol=args.protocol,
        contrast=args.contrast,
        require_label=not args.unlabelled_ok,
        derivatives=args.derivatives,
        label_desc=args.label_desc,
    )


def _add_budget(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "budget", _run_budget)
    p.add_argument(
        "--ledger",
        type=Path,
        required=True,
        help="the site's privacy ledger file (<state-dir>/privacy-ledger.jsonl for `neurofed-site start`)",
    )
    p.add_argument(
        "--init",
        action="store_true",
        help="set up a new site once: create the ledger (and its marker) with the lifetime budget "
        "(needs --set-budget and --delta) and the site secret in the ledger's folder; never overwrites",
    )
    p.add_argument(
        "--set-budget",
        type=float,
        metavar="EPS",
        help="set the lifetime budget's ε for all runs on this site's data (needs --delta)",
    )
    p.add_argument(
        "--delta", type=float, metavar="D", help="the lifetime budget's δ, with --set-budget (e.g. 1e-5)"
    )


def _run_budget(args: argparse.Namespace) -> int:
    """Set up the site's privacy ledger, set its lifetime budget, and show its spending.

    Show the privacy ledger: each federated run's own ε at its δ, and the site's lifetime ε at the
    lifetime δ, every release of every run composed in one RDP accountant (runs' δ are never summed),
    with what is left of the lifetime budget. --init (once, before the site first starts) creates the
    ledger, its marker and the site secret beside it; it never overwrites them. With --set-budget,
    first set the lifetime budget; the site refuses any round that would take the lifetime ε above it.
    Rounds reserved but never completed (a crash mid-round) count as spent. A missing or rolled-back
    ledger is an error: restore the latest backup of the ledger and its marker.
    """
    from client.privacy_budget import run_budget

    return run_budget(args.ledger, set_epsilon=args.set_budget, delta=args.delta, init=args.init)


def _add_keygen(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "keygen", _run_keygen)
    p.add_argument("--out", type=Path, required=True, help="folder to write site.key and site.pub into")


def _run_keygen(args: argparse.Namespace) -> int:
    """Make the site's key pair for joining a federation (send site.pub to the coordinator).

    Write OUT/site.key (the site's private key, mode 0600: keep it on the site machine) and
    OUT/site.pub (send it to the coordinator's operator, who enrolls it with `neurofed coordinator
    enroll site.pub --name SITE`). ECDSA P-384 in OpenSSH format, as Flower's SuperNode
    authentication reads it. An existing pair is never overwritten.
    """
    from client.site_keys import generate_site_keys

    pair = generate_site_keys(args.out)
    print(f"private key: {pair.private_key} (keep it here; mode 0600)")
    print(f"public key:  {pair.public_key} (send it to the coordinator's operator to be enrolled)")
    return 0


def _add_site_options(p: argparse.ArgumentParser) -> None:
    """The options about the site's data, budget, rules and worker (`start` and `worker`)."""
    from client.site_daemon import DEFAULT_STATE_DIR

    p.add_argument("--data", type=Path, required=True, metavar="DATA_DIR", help="the site's data folder")
    p.add_argument(
        "--budget",
        type=float,
        required=True,
        metavar="EPS",
        help="lifetime privacy budget ε (all runs together)",
    )
    p.add_argument("--delta", type=float, default=1e-5, help="lifetime privacy budget δ")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="the site's own files: privacy ledger, preprocessed cache, personalised layers",
    )
    p.add_argument("--site-id", help="the id this site declares (default: the data folder's name)")
    p.add_argument("--role", default="train", choices=["train", "holdout"], help="holdout: evaluate only")
    p.add_argument("--protocol", default="tissue", help="label protocol the data is checked against")
    p.add_argument("--contrast", default="T1w", help="the structural image the network reads (BIDS suffix)")
    p.add_argument(
        "--allow-no-dp",
        action="store_true",
        help="also train in runs without differential privacy (by default the site refuses such rounds, "
        "whatever the coordinator asks)",
    )
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one of the site's own rules, whatever the coordinator asks (repeatable): test-fraction "
        "(0.25), min-test-subjects (5 persons before any test metric is reported), max-evaluations "
        "(20 per run), and the caps max-rounds, max-local-steps, max-batch-size, max-patch-size, "
        "min-spacing-mm, max-grid-voxels",
    )
    p.add_argument(
        "--worker-dir",
        type=Path,
        metavar="DIR",
        help="the site worker's socket and token folder (default: <state-dir>/worker); give `start` and "
        "`worker` the same",
    )
    p.add_argument(
        "--worker-group",
        metavar="GROUP",
        help="the SuperNode's group when it runs as another user than the worker: it may then open the "
        "worker's socket (folder 0750, socket 0660, token 0640); by default only the worker's user may",
    )


def _site_config(args: argparse.Namespace, **more):
    from client.site_daemon import SiteDaemonConfig

    return SiteDaemonConfig(
        data_dir=args.data,
        budget_epsilon=args.budget,
        budget_delta=args.delta,
        state_dir=args.state_dir,
        site_id=args.site_id,
        role=args.role,
        protocol=args.protocol,
        contrast=args.contrast,
        allow_no_dp=args.allow_no_dp,
        policy=tuple(args.policy),
        worker_dir=args.worker_dir,
        worker_group=args.worker_group,
        **more,
    )


def _add_start(sub: argparse._SubParsersAction) -> None:
    from client.site_daemon import DEFAULT_RUNTIME_PORT, WORKER_MODES

    p = add_command(sub, "start", _run_start, defaults_in_help=True)
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's address")
    p.add_argument("--ca", type=Path, required=True, help="the federation's CA certificate (PEM)")
    p.add_argument("--key", type=Path, required=True, help="the site's private key (site.key from keygen)")
    _add_site_options(p)
    p.add_argument(
        "--runtime-port",
        type=int,
        default=DEFAULT_RUNTIME_PORT,
        help="local port of the SuperNode's runtime API (give each SuperNode on one machine its own)",
    )
    p.add_argument(
        "--worker",
        default="supervised",
        choices=WORKER_MODES,
        help="supervised: run the site worker here and restart it on a crash (messages cost a process start, "
        "not a torch import and a data read); external: the worker runs on its own (`neurofed-site worker`, "
        "systemd); off: every message's ClientApp loads everything itself",
    )
    _add_approved_apps_option(p)
    p.add_argument(
        "--trusted-entities",
        type=Path,
        metavar="YAML_FILE",
        help="also require a bundle signature by one of these Flower trusted entities (flower-supernode's "
        "option; only bundles from Flower Hub are signed)",
    )
    p.add_argument("--telemetry", action="store_true", help="allow Flower's anonymous usage telemetry")


def _run_start(args: argparse.Namespace) -> int:
    """Check the site's data, then join the federation (Flower SuperNode, in the foreground).

    Run `neurofed-site check` on DATA_DIR (refusing to start when no subject is usable), then run
    Flower's SuperNode for this site in the foreground (as systemd does): TLS to the coordinator
    (verified with --ca), authenticated with --key (enrolled at the coordinator), runtime
    installation of app dependencies off. It runs only app bundles approved in --approved-apps
    (`neurofed-site approve`); any other bundle the coordinator sends is refused before any of its code
    runs, and every accepted or refused bundle is recorded in <state-dir>/audit.jsonl. Its node config
    gives the site the data folder, site id, state folder (privacy ledger, preprocessed cache) and
    the lifetime privacy budget: rounds that would exceed it are refused. Beside the SuperNode runs the
    site worker (--worker supervised), which keeps the libraries and data loaded and answers every
    message; it is restarted if it crashes. Scans never leave the site.
    """
    from client.site_daemon import start_site

    config = _site_config(
        args,
        coordinator=args.coordinator,
        ca_cert=args.ca,
        private_key=args.key,
        runtime_port=args.runtime_port,
        approved_apps=args.approved_apps,
        trusted_entities=args.trusted_entities,
        worker=args.worker,
    )
    return start_site(config, telemetry=args.telemetry)


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "worker", _run_worker, defaults_in_help=True)
    _add_site_options(p)


def _run_worker(args: argparse.Namespace) -> int:
    """Run the site worker alone, in the foreground (for `neurofed-site start --worker external`).

    The worker holds torch, the network and the site's preprocessed data, and answers every message the
    SuperNode's ClientApps forward over its Unix socket (<state-dir>/worker/worker.sock, or --worker-dir),
    with the site's own rules: DP, budget, caps, split. Give it the same site options as
    `neurofed-site start`. systemd runs it as neurofed-site-worker.service (deploy/systemd).
    """
    from client.site_daemon import run_worker

    return run_worker(_site_config(args))


def _add_approved_apps_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--approved-apps",
        type=Path,
        metavar="FILE",
        help="the approved app bundle hashes, one a line (when not given: <state-dir>/approved-apps.txt)",
    )


def _add_approve(sub: argparse._SubParsersAction) -> None:
    from client.site_daemon import DEFAULT_STATE_DIR

    p = add_command(sub, "approve", _run_approve)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "bundle", type=Path, nargs="?", metavar="BUNDLE.fab", help="a bundle file (flwr build)"
    )
    which.add_argument("--hash", metavar="SHA256", help="the SHA-256 of a bundle (sha256sum BUNDLE.fab)")
    which.add_argument(
        "--installed",
        action="store_true",
        help="the bundle Flower builds from the neurofed installed here (after installing or upgrading it)",
    )
    p.add_argument("--replace", action="store_true", help="approve only this bundle: drop the others")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"the site's state folder ({DEFAULT_STATE_DIR})",
    )
    _add_approved_apps_option(p)


def _run_approve(args: argparse.Namespace) -> int:
    """Approve an app bundle: the only app code the site runs is code its operator approved.

    Add a bundle's SHA-256 to the approved apps (default <state-dir>/approved-apps.txt), which
    `neurofed-site start` reads again for every new run: a bundle whose hash is not there is refused
    before any of its code runs. --installed approves what Flower builds from this neurofed
    installation's source folder (`flwr build` is byte-reproducible, so the coordinator submitting the
    same release sends exactly this bundle); run it again after every upgrade. BUNDLE.fab approves a
    bundle file the coordinator's operator sent (review its code first: it is a zip), --hash a hash
    read to you. Prints the approved hashes.
    """
    from client.approved_apps import approve, approved_apps_path, hash_to_approve

    fab_hash, source = hash_to_approve(args.bundle, args.hash, args.installed)
    path = approved_apps_path(args.state_dir, args.approved_apps)
    approved = approve(path, fab_hash, source, replace=args.replace)
    print(f"approved app bundle {fab_hash} ({source}) in {path}")
    print("this site now runs only:\n" + "\n".join(f"  {h}" for h in approved))
    return 0


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "segment", _run_segment, defaults_in_help=True)
    p.add_argument(
        "inputs", type=Path, nargs="+", metavar="INPUT", help="NIfTI scan(s) or folder(s) of scans"
    )
    p.add_argument(
        "--model", type=Path, required=True, help="model file written by `neurofed train` or a federated run"
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="for one input file: the label map to write (OUT_dseg.nii.gz); otherwise a folder",
    )


def _run_segment(args: argparse.Namespace) -> int:
    """Segment scans with a trained model (native-space label map, volumes, QC image).

    Segment one scan, several scans, or every NIfTI file in a folder. For each input writes the
    label map in the input's native space (same shape and affine; *_dseg.nii.gz), a volumes table
    in mL per structure (*_volumes.csv and *_volumes.json) and a QC image with axial, coronal
    and sagittal slices and the label overlay (*_qc.png). The label map gets the post-processing the
    model file records, the one the model was evaluated with (e.g. largest-brain: islands of label
    away from the brain removed). Inputs are validated first; a bad input is reported and skipped.
    Exits 1 if any input failed.
    """
    from client.segmentation import segment_inputs

    written, failed = segment_inputs(args.model, args.inputs, args.output)
    for out in written:
        print(f"{out.source} -> {out.label_map} (volumes: {out.volumes_csv.name}, QC: {out.qc_png.name})")
    for source, reason in failed:
        print(f"FAILED {source}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def add_segment_command(sub: argparse._SubParsersAction) -> None:
    """Add ``segment``: what a hospital runs on its own scans (also `neurofed segment`)."""
    _add_segment(sub)


def build_parser() -> argparse.ArgumentParser:
    return command_parser(
        "neurofed-site",
        "neurofed site daemon tools for hospital research IT: check the site's data before joining a "
        "federation, keep its privacy budget, approve the app code it runs, start its daemon, and segment "
        "its own scans with a trained model. Scans never leave the site. Run `neurofed-site COMMAND --help` for options.",
        [_add_check, _add_budget, _add_keygen, _add_approve, _add_start, _add_worker, _add_segment],
    )


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, (NeurofedError,))


if __name__ == "__main__":
    sys.exit(main())
