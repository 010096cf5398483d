"""What a simulated run needs around the federation on this machine: the sites' data (synthesized when
none is given) and, once the rounds are done, the full report: the cross-site study evaluation
(study/study_evaluation.py: local-only and pooled baselines, every model on every site, the membership
audit), which needs every site's data, then report.md / report.html (server/report/).

Used by `neurofed simulate` and `neurofed report` (study/cli.py) and by the Flower app's ServerApp
(study/flower_app.py, ``flwr run .``).
"""

from __future__ import annotations

from pathlib import Path

from contract.run_config import RunConfig

DATA_FOLDER = "data"
"""Where a simulation without a data root gets its synthesized sites: ``<run-dir>/data``."""


def default_data_root(run_dir: Path | str) -> Path:
    """The synthesized sites' folder of a run directory."""
    return Path(run_dir) / DATA_FOLDER


def synthesize_run_data(
    config: RunConfig, data_root: Path, label_maps_dir: Path | None = None, progress: bool = True
) -> None:
    """Write ``config.num_sites`` simulated sites into ``data_root``: ``simulated_subjects_per_site`` subjects
    at each training site, ``simulated_unseen_subjects`` at each unseen one (the last sites), at the run's
    spacing and seed (the built-in head phantom, or ``label_maps_dir``)."""
    from study.synthesis import synthesize_sites

    trained, unseen = config.num_training_sites, config.unseen_sites
    counts = [config.simulated_subjects_per_site] * trained + [config.simulated_unseen_subjects] * unseen
    print(
        f"synthesizing {trained} training sites x {counts[0]} subjects"
        + (f" and {unseen} unseen site(s) x {counts[-1]}" if unseen else "")
        + f" into {data_root}",
        flush=True,
    )
    synthesize_sites(
        data_root,
        n_sites=config.num_sites,
        subjects_per_site=counts,
        label_maps_dir=label_maps_dir,
        spacing_mm=config.spacing_mm,
        seed=config.seed,
        progress=progress,
    )


def with_run_data(config: RunConfig, progress: bool = True) -> RunConfig:
    """``config`` with a data root: its own, or ``<run-dir>/data``, synthesized there unless it exists."""
    if config.data_root:
        return config
    data_root = default_data_root(Path(config.run_dir).expanduser().resolve())
    if not data_root.is_dir():
        synthesize_run_data(config, data_root, progress=progress)
    return config.replace(data_root=str(data_root))


def evaluate_and_report(
    run_dir: Path, data_root: Path | None = None, *, evaluate: bool = True, progress: bool = True
) -> Path:
    """Build evaluation.json (when ``evaluate``) from the sites' data, then the report from the run's files;
    returns report.html's path.

    Args:
        data_root: the run's folder of site folders; default the one stored in its config.
        progress: show each phase's progress (common/progress.py).
    """
    from server.report import write_report

    if evaluate:
        from study.study_evaluation import evaluate_study

        print(f"evaluating federated, local-only and pooled models on every site of {run_dir}", flush=True)
        print(f"evaluation: {evaluate_study(run_dir, data_root, progress=progress)}", flush=True)
    print("writing the report", flush=True)
    markdown, page = write_report(run_dir)
    print(f"report: {page} (and {markdown.name})")
    print(f"open in a browser: {page.resolve().as_uri()}", flush=True)
    return page
