"""The cross-site evaluation of a finished federated run: federated vs local-only vs pooled, on every site.

A simulated study holds all sites' data on one machine, so after the rounds the researcher can train the
comparison models and score every model on every site's test split. This needs the data, hence it lives
in study/ (a researcher's machine); the coordinator's report (server/report/) reads only what it writes
(the schema: contract/evaluation.py).

Comparison models (same network, initialisation seed, patch size, batch size, learning rate, augmentation
and preprocessing plan as the run; each trained centrally with one optimizer):

- local-only, one per training site: ``rounds x local_steps`` optimizer steps on that site's training
  split, the steps that site ran in the federation;
- pooled: ``rounds x local_steps x n_training_sites`` steps on all training splits pooled, the total
  compute of the federation.

Every model (the run's final global model, each local-only model, the pooled model) is scored on the test
split of every site: a training site's held-out split, and all subjects of an unseen (holdout) site. The
split is the federation's own (`client.site_split.split_subjects` keyed by each site's secret in the run directory).

Written into the run directory::

    evaluation.json               per model, site and subject: Dice, HD95 (mm), ASSD (mm), |volume
                                  difference| (mL) per foreground class; budgets; QC image list
    baselines/local-<site>.pt     the local-only models (model files, models/model_file.py)
    baselines/pooled.pt           the pooled model
    qc/<site>_<subject>_qc.png    the global model's segmentation of a few unseen-site subjects

evaluation.json also holds ``membership_audit``: the membership-inference audit of the final global model
(study/membership_audit.py): each training site's training split (members) vs its test split
(non-members), calibrated on the unseen sites' subjects.

Segmentation and QC are on the preprocessed grid (the plan's spacing, RAS axes), where the metrics are
computed too; QC images overlay the prediction on the preprocessed image. The unseen sites' subjects are
scored a second time on each scan's own voxel grid, as a site's `neurofed segment` output, beside the
working grid's partial-volume ceiling (study/native_scoring.py).

Everything is seeded: the same run directory and data give the same evaluation.json (up to timestamps).

The sites are loaded by study/study_sites.py, the comparison models trained by study/study_baselines.py;
this module scores them and writes the document.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from common.atomic_files import atomic_write_text
from common.progress import Progress
from contract.evaluation import (
    FEDERATED,
    FEDERATED_WITHOUT_DP,
    FORMAT,
    FORMAT_VERSION,
    NATIVE_CEILING,
    NATIVE_RESULTS,
    PERSONALISED,
    REPORTED_METRICS,
    STARTING,
    STARTING_KIND,
    finite_or_none,
    result_record,
)
from contract.run_config import RunConfig
from contract.run_layout import EVALUATION_FILE, FINAL_MODEL_FILE, QC_DIR, WITHOUT_DP_DIR
from contract.wire import ROLE_HOLDOUT, ROLE_TRAIN
from models.errors import NeurofedError
from study.native_scoring import ceiling_scores, load_native_reference, native_record, native_scores
from study.public_anatomy import anatomy_seen
from study.study_baselines import budget_rule, personalised_models, starting_network, train_comparison_models
from study.study_sites import StudySite, load_study_sites

T = TypeVar("T")


def chance_mean_dice(label: np.ndarray, num_classes: int) -> float:
    """Expected mean foreground Dice of random labels drawn with the true class proportions.

    For a class covering a share ``p`` of the grid, labelling each voxel with it at probability ``p``
    has expected Dice ``p``; the chance level is the mean of ``p`` over the foreground classes.
    """
    counts = np.bincount(np.asarray(label, dtype=np.int64).ravel(), minlength=num_classes)
    return float(np.mean(counts[1:] / counts.sum()))


def _score(model, image: np.ndarray, label: np.ndarray, settings: Any, class_names: Sequence[str], spacing):
    """(probabilities (K, X, Y, Z), prediction (X, Y, Z) uint8, {class: {metric: value}}) of one subject on
    the grid: sliding-window inference, then the run's post-processing."""
    import torch

    from models.inference import predict_volume
    from models.metrics import segmentation_metrics
    from models.postprocessing import predicted_labels

    model.eval()
    with torch.inference_mode():
        probabilities = predict_volume(model, image, (settings.patch_size,) * 3)
    prediction = predicted_labels(probabilities, settings.postprocessing)
    scores = segmentation_metrics(prediction, np.asarray(label), class_names, spacing)
    return probabilities, prediction, scores


def audit_final_model(model, sites: Sequence[StudySite], settings: Any, on_subject=None):
    """The membership-inference audit (study/membership_audit.py) of ``model``: each training site's
    training split (members) vs its test split (non-members), calibrated on the unseen sites' subjects;
    losses on the run's training patch size, seeded by the run's seed."""
    from study.membership_audit import AuditSettings, audit_membership

    return audit_membership(
        model,
        {s.site_id: (s.train, s.test) for s in sites if s.role == ROLE_TRAIN},
        {s.site_id: s.test for s in sites if s.role == ROLE_HOLDOUT},
        AuditSettings(patch_size=(settings.patch_size,) * 3, seed=settings.seed),
        on_subject=on_subject,
    )


def _reference_models(
    run_dir: Path, settings: RunConfig, document: Mapping[str, Any], budget: Mapping[str, Any]
) -> tuple[dict[str, Any], list[dict]]:
    """The starting model alone (unless the run started from random weights) and the run's without-DP arm
    (study/comparison_arm.py) where it was trained, with their evaluation.json descriptions."""
    from models.model_file import load_model

    models: dict[str, Any] = {}
    descriptions: list[dict] = []
    if document.get("starting_model"):
        models[STARTING] = starting_network(settings)
        descriptions.append(
            # The model file's own "kind" (e.g. pretrained-public) is kept as its provenance.
            {
                **document["starting_model"],
                "name": STARTING,
                "kind": STARTING_KIND,
                "provenance": document["starting_model"].get("kind"),
                "trained_on": [],
                "steps": 0,
            }
        )
    arm = run_dir / WITHOUT_DP_DIR / FINAL_MODEL_FILE
    if settings.dp and arm.is_file():
        models[FEDERATED_WITHOUT_DP] = load_model(arm).model
        descriptions.append(
            {
                "name": FEDERATED_WITHOUT_DP,
                "kind": "federated",
                "dp": False,
                "steps": budget["federated_steps_total"],
                "steps_per_site": budget["federated_steps_per_site"],
                "file": f"{WITHOUT_DP_DIR}/{FINAL_MODEL_FILE}",
            }
        )
    return models, descriptions


def evaluate_study(
    run_dir: Path,
    data_root: Path | None = None,
    *,
    qc_subjects: int = 3,
    progress: bool = True,
) -> Path:
    """Train the comparison models of a finished run, score every model on every site, write the results.

    Args:
        run_dir: a finished run directory (config.json, final-model.pt).
        data_root: the folder of site folders the run used; default the run's ``data_root`` setting.
        qc_subjects: how many subjects of each unseen site get a QC image of the global model.
        progress: show the progress of each phase (preparing the sites, training each comparison model,
            scoring, the audit; common/progress.py).

    Returns:
        The path of ``evaluation.json``.
    """
    from models.label_protocols import get_protocol
    from models.model_file import load_model
    from server.run_directory import RunDirectory

    run_dir = Path(run_dir)
    run_files = RunDirectory(run_dir)
    document = run_files.read_document()
    run_config = document["run_config"]
    final_model = run_files.final_model_path
    if not final_model.is_file():
        raise NeurofedError(
            f"{run_dir} holds no final model (final-model.pt): the run did not finish; continue it with "
            f"`neurofed simulate --resume {run_dir}`"
        )
    settings = RunConfig.from_dict(run_config)
    if data_root is None:
        data_root = Path(str(run_config.get("data_root") or "")) if run_config.get("data_root") else None
    if data_root is None or not Path(data_root).is_dir():
        raise NeurofedError(
            f"the run's data root {data_root or '(not recorded)'} is not a folder: pass the folder of site "
            "folders the run used with --data-root"
        )
    data_root = Path(data_root)
    protocol = get_protocol(settings.protocol)
    class_names = protocol.class_names
    sites = load_study_sites(run_dir, data_root, settings, document["sites"], progress=progress)
    trainers = [s for s in sites if s.role == ROLE_TRAIN]
    budget = budget_rule(int(run_config["num_rounds"]), settings.local_steps, len(trainers))
    models: dict[str, Any] = {FEDERATED: load_model(final_model).model}
    descriptions = [
        {
            "name": FEDERATED,
            "kind": "federated",
            "trained_on": [s.site_id for s in trainers],
            "steps": budget["federated_steps_total"],
            "steps_per_site": budget["federated_steps_per_site"],
            "file": "final-model.pt",
            "dp": settings.dp,
        }
    ]
    extra_models, extra_descriptions = _reference_models(run_dir, settings, document, budget)
    models.update(extra_models)
    descriptions += extra_descriptions
    trained = train_comparison_models(run_dir, settings, trainers, budget, progress=progress)
    for baseline in trained:
        models[baseline.name] = baseline.model
        descriptions.append(
            {
                "name": baseline.name,
                "kind": baseline.kind,
                "trained_on": baseline.trained_on,
                "steps": baseline.steps,
                "final_train_loss": finite_or_none(baseline.losses[-1]) if baseline.losses else None,
                "file": baseline.file,
            }
        )

    personalised = (
        personalised_models(run_dir, models[FEDERATED], sites, int(run_config["num_rounds"]))
        if run_config.get("strategy") == "fedbn"
        else {}
    )
    if personalised:
        descriptions.append(
            {
                "name": PERSONALISED,
                "kind": "personalised",
                "trained_on": sorted(personalised),
                "steps": budget["federated_steps_total"],
                "steps_per_site": budget["federated_steps_per_site"],
                "file": "final-model.pt",
                "site_layers": {site: file for site, (_, file) in personalised.items()},
            }
        )
    scored = _score_sites(run_dir, sites, models, personalised, settings, protocol, qc_subjects, progress)
    n_audited = sum(len(s.test) + len(s.train) for s in sites)
    with Progress("membership audit", n_audited, show=progress) as bar:
        audit = audit_final_model(models[FEDERATED], sites, settings, on_subject=bar.advance)

    evaluation = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "protocol": protocol.name,
        "classes": list(class_names[1:]),
        "metrics": list(REPORTED_METRICS),
        "units": {"dice": "1", "hd95_mm": "mm", "assd_mm": "mm", "abs_volume_diff_ml": "mL"},
        "grid": f"preprocessed grid, {settings.spacing_mm:g} mm isotropic, RAS",
        "global_model_rounds": int(run_config["num_rounds"]),
        "data_root": str(data_root),
        "budget": budget,
        "sites": [
            {
                "site": s.site_id,
                "role": s.role,
                "train_subjects": [i for i, _, _ in s.train],
                "test_subjects": [i for i, _, _ in s.test],
                "chance_mean_dice": {i: chance_mean_dice(label, len(class_names)) for i, _, label in s.test},
            }
            for s in sites
        ],
        "models": descriptions,
        "results": scored.results,
        "qc": scored.qc,
        NATIVE_RESULTS: scored.native,
        NATIVE_CEILING: scored.ceiling,
        "membership_audit": audit.to_dict(),
        "starting_model_anatomy": (
            anatomy_seen(document["starting_model"], [data_root / s.site_id for s in sites])
            if document.get("starting_model")
            else None
        ),
    }
    path = run_dir / EVALUATION_FILE
    atomic_write_text(path, json.dumps(evaluation, indent=1))
    return path


@dataclass
class SiteScores:
    """What `_score_sites` writes into evaluation.json: ``results``, ``qc``, and on the unseen sites' scans'
    own grids `NATIVE_RESULTS` and `NATIVE_CEILING` (study/native_scoring.py)."""

    results: list[dict] = field(default_factory=list)
    qc: list[dict] = field(default_factory=list)
    native: list[dict] = field(default_factory=list)
    ceiling: list[dict] = field(default_factory=list)


def _score_sites(
    run_dir: Path,
    sites: Sequence[StudySite],
    models: Mapping[str, Any],
    personalised: Mapping[str, tuple[Any, str]],
    settings: RunConfig,
    protocol: Any,
    qc_subjects: int,
    progress: bool,
) -> SiteScores:
    """Every model (and a site's own personalised one) on every test subject of every site, on the grid;
    on the unseen sites also on each scan's own grid; QC images of the global model on the first
    ``qc_subjects`` of each unseen site."""
    class_names = protocol.class_names
    spacing = (settings.spacing_mm,) * 3
    out = SiteScores()
    # The unseen sites' subjects cost more (scored on their own grid too): spread among the others, so the
    # progress line's time left, which assumes steps alike, holds from the start.
    subjects = _spread_evenly(
        [
            [(site, subject, {**models, **_own_model(personalised, site.site_id)}) for subject in site.test]
            for site in sites
        ]
    )
    with Progress("cross-site evaluation", sum(len(m) for *_, m in subjects), show=progress) as bar:
        for site, (subject_id, image, label), site_models in subjects:
            identity = {"site": site.site_id, "role": site.role, "subject": subject_id}
            reference = None
            if site.role == ROLE_HOLDOUT:
                reference = load_native_reference(
                    site.label_files[subject_id], site.transforms[subject_id], protocol
                )
                out.ceiling.append(
                    native_record(ceiling_scores(label, reference, class_names), reference, **identity)
                )
            for name, model in site_models.items():
                bar.working_on(f"{name} on {site.site_id} {subject_id}")
                probabilities, prediction, scores = _score(
                    model, image, label, settings, class_names, spacing
                )
                out.results.append(result_record(scores, model=name, **identity))
                mean_dice = out.results[-1]["mean_dice"]
                if reference is not None:
                    scored = native_scores(probabilities, reference, class_names, settings.postprocessing)
                    out.native.append(native_record(scored, reference, model=name, **identity))
                bar.advance(f"{name} on {site.site_id} {subject_id}: mean Dice {mean_dice:.3f}")
                if name == FEDERATED and reference is not None and _qc_count(out.qc, site) < qc_subjects:
                    out.qc.append(_write_qc(run_dir, site, subject_id, image, prediction, class_names))
    return out


def _spread_evenly(groups: Sequence[Sequence[T]]) -> list[T]:
    """The items of all ``groups`` in one list, each group's spread evenly over it, in the group's order:
    item i of a group of n sits at the fraction (i + 0.5) / n of the list."""
    placed = [
        ((i + 0.5) / len(group), g, item) for g, group in enumerate(groups) for i, item in enumerate(group)
    ]
    return [item for *_, item in sorted(placed, key=lambda entry: entry[:2])]


def _qc_count(qc: Sequence[Mapping[str, Any]], site: StudySite) -> int:
    return len([q for q in qc if q["site"] == site.site_id])


def _write_qc(run_dir: Path, site: StudySite, subject_id: str, image, prediction, class_names) -> dict:
    """The QC image of the global model's segmentation of one subject, on the grid; its qc entry."""
    import nibabel as nib

    from client.segmentation import write_qc_png

    png = run_dir / QC_DIR / f"{site.site_id}_{subject_id}_qc.png"
    grid_image = nib.Nifti1Image(
        image[0].astype(np.float32), np.asarray(site.transforms[subject_id].grid_affine)
    )
    write_qc_png(grid_image, prediction, class_names, png)
    return {"site": site.site_id, "subject": subject_id, "model": FEDERATED, "file": f"{QC_DIR}/{png.name}"}


def _own_model(personalised: Mapping[str, tuple[Any, str]], site_id: str) -> dict[str, Any]:
    """A training site's own personalised model (FedBN), scored on that site only."""
    return {PERSONALISED: personalised[site_id][0]} if site_id in personalised else {}
