"""The report's sections from evaluation.json: the federated model against the local-only, pooled and
(FedBN) personalised models, per training site, as a generalization matrix, in Wilcoxon tests, and on
each unseen site."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from contract.evaluation import (
    FEDERATED,
    LOCAL_PREFIX,
    PERSONALISED,
    POOLED,
    REPORTED_METRICS,
    local_model_name,
)
from contract.run_layout import FIGURES_DIR
from server.report.figures import plot_matrix
from server.report.records import EvaluationResults
from server.report.render import Figure, Section, Table
from server.report.statistics import summary_cell, wilcoxon_line

METRIC_LABELS = dict(zip(REPORTED_METRICS, ("Dice", "HD95 (mm)", "ASSD (mm)", "|ΔV| (mL)"), strict=True))
"""A table's label of each of evaluation.json's metrics."""


def _model_label(name: str) -> str:
    if name == PERSONALISED:
        return "personalised (own site's normalization layers)"
    return name.removeprefix(LOCAL_PREFIX) + " (local-only)" if name.startswith(LOCAL_PREFIX) else name


def _class_table(results: EvaluationResults, site: str, models: Sequence[str]) -> Table:
    header = ["class", "metric"] + [_model_label(m) for m in models]
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
    sections = [Section("Per-site results (training sites' test splits)", intro)]
    for site in trainers:
        own = [m for m in results.local_models if m == local_model_name(site)]
        compared = [FEDERATED, *results.personalised, *own, *results.pooled]
        sections.append(Section(site, [_class_table(results, site, compared)], level=3))
    return sections


def generalization_section(
    results: EvaluationResults, site_ids: Sequence[str], unseen: Sequence[str], root: Path
) -> Section:
    """Mean Dice of every model on every site, as a table and a heatmap (written under ``figures/``)."""
    rows = [*results.local_models, *results.pooled, FEDERATED, *results.personalised]
    columns = [f"{s} (unseen)" if s in unseen else s for s in site_ids]
    matrix = np.array(
        [[np.mean(v) if (v := results.mean_dice(m, s)) else np.nan for s in site_ids] for m in rows]
    )
    heatmap = f"{FIGURES_DIR}/generalization_matrix.png"
    plot_matrix(matrix, [_model_label(m) for m in rows], columns, root / heatmap)
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
        ["model \\ test site", *columns],
        [[_model_label(m), *(summary_cell(results.mean_dice(m, s)) for s in site_ids)] for m in rows],
    )
    return Section(
        "Generalization matrix (train site x test site)",
        [text, table, Figure(heatmap, "Generalization matrix: mean Dice, model x test site")],
    )


def wilcoxon_section(results: EvaluationResults, trainers: Sequence[str]) -> Section:
    """Federated vs each training site's local-only model on that site, then pooled over the sites."""
    section = Section("Federated vs local-only (Wilcoxon signed-rank test)")
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


def _unseen_verdict(results: EvaluationResults, site: str) -> str:
    """The federated model on an unseen site against chance, the worst local-only model and pooled."""
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
            f"; worst local-only model {_model_label(worst)} {mean_of[worst]:.3f}: "
            f"{'better' if mean_of[FEDERATED] > mean_of[worst] else 'NOT better'} than it"
        )
    if pooled:
        verdict += f"; pooled {mean_of[POOLED]:.3f}"
    return verdict + "."


def unseen_site_section(results: EvaluationResults, site: str) -> Section:
    """An unseen site (never trained): the verdict, per-class results, tests and QC images."""
    baselines = [*results.local_models, *results.pooled]
    section = Section(f"Unseen site {site} (never trained)", [_unseen_verdict(results, site)])
    section.blocks.append(_class_table(results, site, [FEDERATED, *baselines]))
    fed = results.mean_dice(FEDERATED, site)
    for m in baselines:
        section.blocks.append(
            wilcoxon_line(f"federated vs {_model_label(m)} on unseen {site}", fed, results.mean_dice(m, site))
        )
    for qc in results.qc(site):
        section.blocks.append(
            Figure(qc["file"], f"QC: federated model's segmentation of {site} {qc['subject']}")
        )
    return section
