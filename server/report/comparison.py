"""The report's sections from evaluation.json: the federated model against the local-only, pooled and
(FedBN) personalised models, per training site, as a generalization matrix, in Wilcoxon tests, and on
each unseen site; and which models the report compares on a site (`compared_models`), for these tables
and the figures (server/report/figure_section.py) alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contract.evaluation import (
    FEDERATED,
    LOCAL_PREFIX,
    PERSONALISED,
    POOLED,
    REPORTED_METRICS,
    local_model_name,
)
from server.report.records import EvaluationResults
from server.report.render import Section, Table
from server.report.statistics import summary_cell, wilcoxon_line

METRIC_LABELS = dict(zip(REPORTED_METRICS, ("Dice", "HD95 (mm)", "ASSD (mm)", "|ΔV| (mL)"), strict=True))
"""A table's label of each of evaluation.json's metrics."""


def model_label(name: str) -> str:
    """How the report names a model of evaluation.json."""
    if name == PERSONALISED:
        return "personalised (own site's normalization layers)"
    return name.removeprefix(LOCAL_PREFIX) + " (local-only)" if name.startswith(LOCAL_PREFIX) else name


def compared_models(results: EvaluationResults, site: str, unseen: bool) -> list[str]:
    """The models the report compares on a site's test split: on a training site the federated model,
    (FedBN) that site's personalised model, its own local-only model and pooled; on an unseen site the
    federated model, every local-only model and pooled."""
    if unseen:
        return [FEDERATED, *results.local_models, *results.pooled, *results.other_models]
    own = [m for m in results.local_models if m == local_model_name(site)]
    return [FEDERATED, *results.personalised, *own, *results.pooled, *results.other_models]


def _class_table(results: EvaluationResults, site: str, models: Sequence[str]) -> Table:
    header = ["class", "metric"] + [model_label(m) for m in models]
    rows = [["all (mean over classes)", "Dice"] + [summary_cell(results.mean_dice(m, site)) for m in models]]
    for cls in results.classes:
        for metric in results.metrics:
            rows.append(
                [cls, METRIC_LABELS.get(metric, metric)]
                + [summary_cell(results.metric(m, site, cls, metric)) for m in models]
            )
    return Table(header, rows)


def per_site_sections(results: EvaluationResults, trainers: Sequence[str]) -> list[Section]:
    """Each training site's test split: the federated model vs its own local-only model vs pooled (and
    FedBN's personalised model), one subsection per site."""
    intro = ["Each training site: the federated model vs that site's own local-only model vs pooled."]
    if results.personalised:
        intro.append(
            "FedBN: 'federated' is the global model (the averaged shared layers; its normalization layers "
            "stay as initialised, since every site keeps its own); 'personalised' is that site's own model: "
            "its normalization layers with the global rest. Personalised vs global shows what keeping the "
            "normalization local buys on the site's own scanner."
        )
    sections = [Section("Per-site results (training sites' test splits)", intro, collapsed=True)]
    for site in trainers:
        compared = compared_models(results, site, unseen=False)
        sections.append(Section(site, [_class_table(results, site, compared)], level=3, collapsed=True))
    return sections


def generalization_rows(results: EvaluationResults) -> list[str]:
    """The models of the generalization matrix, in row order."""
    return [*results.local_models, *results.pooled, FEDERATED, *results.personalised, *results.other_models]


def generalization_matrix(results: EvaluationResults, site_ids: Sequence[str]) -> np.ndarray:
    """Mean over test subjects of the per-subject mean Dice, `generalization_rows` x ``site_ids``; NaN
    where a model was not scored on a site."""
    return np.array(
        [
            [np.mean(v) if (v := results.mean_dice(m, s)) else np.nan for s in site_ids]
            for m in generalization_rows(results)
        ]
    )


def site_column(site: str, unseen: Sequence[str]) -> str:
    """A test site as a column or panel title: ``site-03 (unseen)`` for an unseen site."""
    return f"{site} (unseen)" if site in unseen else site


def generalization_section(
    results: EvaluationResults, site_ids: Sequence[str], unseen: Sequence[str]
) -> Section:
    """Mean Dice of every model on every site, as a table (the heatmap is among the report's figures)."""
    rows = generalization_rows(results)
    text = (
        "Mean over test subjects of the per-subject mean Dice; rows: the model (trained on), columns: the "
        "site it is tested on. Unseen sites never trained."
    )
    if results.personalised:
        text += (
            " The personalised row holds each training site's own personalised model on its own test split "
            "(an unseen site has none)."
        )
    table = Table(
        ["model \\ test site", *(site_column(s, unseen) for s in site_ids)],
        [[model_label(m), *(summary_cell(results.mean_dice(m, s)) for s in site_ids)] for m in rows],
    )
    return Section("Generalization matrix (train site x test site)", [text, table], collapsed=True)


def wilcoxon_section(results: EvaluationResults, trainers: Sequence[str]) -> Section:
    """Federated vs each training site's local-only model on that site, then pooled over the sites."""
    section = Section("Federated vs local-only (Wilcoxon signed-rank test)", collapsed=True)
    all_fed: list[float] = []
    all_local: list[float] = []
    for site in trainers:
        fed, local = results.mean_dice(FEDERATED, site), results.mean_dice(local_model_name(site), site)
        if len(fed) == len(local):
            all_fed += fed
            all_local += local
        section.blocks.append(wilcoxon_line(f"federated vs local-only on {site}", fed, local))
    section.blocks.append(
        wilcoxon_line(
            "federated vs each site's own local-only model, pooled over training sites", all_fed, all_local
        )
    )
    return section


def unseen_verdict(results: EvaluationResults, site: str) -> str:
    """One sentence: the federated model's mean Dice on an unseen site against chance, the worst local-only
    model and pooled."""
    locals_, pooled = results.local_models, results.pooled
    chance = results.chance(site)
    mean_of = {m: float(np.mean(results.mean_dice(m, site))) for m in [FEDERATED, *locals_, *pooled]}
    worst = min(locals_, key=lambda m: mean_of[m]) if locals_ else None
    verdict = f"Federated mean Dice {mean_of[FEDERATED]:.3f}"
    if chance:
        verdict += (
            f"; chance level {np.mean(chance):.3f} (random labels with the true class proportions): "
            f"{'better' if mean_of[FEDERATED] > np.mean(chance) else 'NOT better'} than chance"
        )
    if worst is not None:
        verdict += (
            f"; worst local-only model {model_label(worst)} {mean_of[worst]:.3f}: "
            f"{'better' if mean_of[FEDERATED] > mean_of[worst] else 'NOT better'} than it"
        )
    if pooled:
        verdict += f"; pooled {mean_of[POOLED]:.3f}"
    return verdict + "."


def unseen_site_section(results: EvaluationResults, site: str) -> Section:
    """An unseen site (never trained): the verdict, per-class results and tests (its QC images are among
    the report's figures)."""
    compared = compared_models(results, site, unseen=True)
    section = Section(f"Unseen site {site} (never trained)", [unseen_verdict(results, site)], collapsed=True)
    section.blocks.append(_class_table(results, site, compared))
    if results.own_grid is not None and results.own_grid_differs(site):
        section.blocks.append(
            "The same models on each scan's own voxel grid, as `neurofed segment` labels the scan (the working "
            "grid's probabilities mapped onto the scan before the argmax and the post-processing), against the "
            "scan's own label map; distances in mm there. A segmentation perfect on the working grid scores "
            f"{summary_cell(results.native_ceiling(site))} mean Dice on it (the partial-volume limit)."
        )
        section.blocks.append(_class_table(results.own_grid, site, compared))
    fed = results.mean_dice(FEDERATED, site)
    for m in compared[1:]:
        section.blocks.append(
            wilcoxon_line(f"federated vs {model_label(m)} on unseen {site}", fed, results.mean_dice(m, site))
        )
    return section
