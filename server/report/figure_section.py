"""The report's figures section, shown right after the summary: per-site bars of the compared models with
per-subject points, the global model's Dice per round, the generalization heatmap, ε per round and the
QC images of the unseen sites. It draws each figure (server/report/figures.py) under ``RUN_DIR/figures``;
the detailed sections after it hold the tables only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from contract.evaluation import LOCAL_PREFIX
from contract.wire import ROLE_HOLDOUT
from server.report.comparison import (
    compared_models,
    generalization_matrix,
    generalization_rows,
    model_label,
    site_column,
)
from server.report.figures import (
    DICE_PER_ROUND_PNG,
    EPSILON_PER_ROUND_PNG,
    GENERALIZATION_PNG,
    SITE_COMPARISON_PNG,
    Bar,
    plot_matrix,
    plot_per_round,
    plot_site_comparison,
)
from server.report.privacy import Epsilon
from server.report.records import EvaluationResults, RunRecords
from server.report.render import Block, Figure, Section


def dice_series(events: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Mean Dice per round from the sites' own evaluations during the run, per site (and model)."""
    dice: dict[str, list[tuple[int, float]]] = {}
    for e in events:
        if e.get("event") == "evaluate" and (e.get("metrics") or {}).get("dice-mean") is not None:
            label = e["site"] + (" (unseen)" if e.get("role") == ROLE_HOLDOUT else "")
            if e.get("model", "global") != "global":
                label += f" [{e['model']}]"
            dice.setdefault(label, []).append((int(e["round"]), float(e["metrics"]["dice-mean"])))
    return dice


def _bar_label(model: str) -> str:
    """A model's short name under its bar: ``local-only site-01`` rather than the table's label."""
    return f"local-only {model.removeprefix(LOCAL_PREFIX)}" if model.startswith(LOCAL_PREFIX) else model


def site_comparison_figure(records: RunRecords, results: EvaluationResults) -> Figure:
    """Per test site, a bar per compared model (`compared_models`) with its per-subject mean Dice as
    points, and the site's chance level."""
    unseen = records.unseen_sites()
    panels: dict[str, list[Bar]] = {}
    chance: dict[str, float] = {}
    for site in (s["site"] for s in records.sites()):
        title = site_column(site, unseen)
        models = compared_models(results, site, unseen=site in unseen)
        panels[title] = [(_bar_label(m), results.kinds[m], results.mean_dice(m, site)) for m in models]
        if results.chance(site):
            chance[title] = float(np.mean(results.chance(site)))
    plot_site_comparison(panels, chance, records.root / SITE_COMPARISON_PNG)
    return Figure(
        SITE_COMPARISON_PNG,
        "Mean Dice per test site: federated vs local-only vs pooled (bars: mean over the site's test "
        "subjects; points: each subject; dashed: chance level). A training site is compared with its own "
        "local-only model, an unseen site with every one.",
    )


def _generalization_figure(records: RunRecords, results: EvaluationResults) -> Figure:
    site_ids = [s["site"] for s in records.sites()]
    columns = [site_column(s, records.unseen_sites()) for s in site_ids]
    labels = [model_label(m) for m in generalization_rows(results)]
    plot_matrix(generalization_matrix(results, site_ids), labels, columns, records.root / GENERALIZATION_PNG)
    return Figure(GENERALIZATION_PNG, "Generalization matrix: mean Dice, model x test site")


def _dice_per_round_figure(records: RunRecords) -> Block:
    dice = dice_series(records.events)
    if not dice:
        return "No evaluation events in metrics.jsonl."
    plot_per_round(
        dice,
        "mean Dice (test split)",
        "global model's test Dice per round and site",
        records.root / DICE_PER_ROUND_PNG,
    )
    return Figure(DICE_PER_ROUND_PNG, "Mean Dice of the global model per round, per site")


def _epsilon_figure(records: RunRecords, epsilon: Epsilon) -> Figure:
    plot_per_round(
        epsilon, "ε (cumulative)", "privacy loss per round and site", records.root / EPSILON_PER_ROUND_PNG
    )
    return Figure(EPSILON_PER_ROUND_PNG, "ε per round, per site")


def _qc_figures(results: EvaluationResults, unseen: Sequence[str]) -> list[Block]:
    return [
        Figure(qc["file"], f"QC: federated model's segmentation of {site} {qc['subject']}")
        for site in unseen
        for qc in results.qc(site)
    ]


def figures_section(records: RunRecords, epsilon: Epsilon) -> Section:
    """Every figure of the report, drawn now: the comparison per site (with evaluation.json), Dice per
    round, the generalization heatmap, ε per round (with DP) and the QC images."""
    section = Section("Figures", anchor="figures")
    results = EvaluationResults(records.evaluation) if records.evaluation is not None else None
    if results is not None:
        section.blocks.append(site_comparison_figure(records, results))
    section.blocks.append(_dice_per_round_figure(records))
    if results is not None:
        section.blocks.append(_generalization_figure(records, results))
    if epsilon:
        section.blocks.append(_epsilon_figure(records, epsilon))
    if results is not None:
        section.blocks += _qc_figures(results, records.unseen_sites())
    return section
