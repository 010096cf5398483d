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
            "is a BIDS dataset: sub-*/anat/*_<contrast>.nii.gz, *_mask.nii.gz and "
            "derivatives/labels/sub-*/anat/*_dseg.nii.gz with FreeSurfer label values."
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
    )
    return 0


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
