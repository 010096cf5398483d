"""The report of a federated run: ``report.md`` and ``report.html`` from the files of its run directory.

Reads only the run directory (the coordinator never needs the sites' data):

- ``config.json``: the run's settings and its sites;
- ``metrics.jsonl``: per-round events (test Dice per site per round; ``epsilon`` per site per round once
  differential privacy is on);
- ``evaluation.json`` (study/study_evaluation.py): per model, site and subject, Dice / HD95 (mm) /
  ASSD (mm) / |volume difference| (mL) per class, for the federated, local-only and pooled models.

Writes ``report.md`` and ``report.html`` (the same content; the HTML needs nothing but the image files
beside it) and the figures under ``figures/``; QC images are those evaluation.json lists under ``qc/``.
The report opens with a summary (the unseen site's mean Dice per model, privacy, who took part, wall
time), then the figures, then the detailed tables (collapsed in the HTML).

The statistics: per-subject mean Dice is the mean over the protocol's foreground classes of one subject's
Dice; tables give mean ± sd (median) over subjects, skipping undefined distances (a class missing from a
prediction). Federated vs local-only is a two-sided Wilcoxon signed-rank test (scipy) on paired
per-subject mean Dice.

The package, one job a module: records.py reads the run directory; statistics.py computes table cells
and tests; figures.py draws; summary.py builds the first section, figure_section.py the figures, and
sections.py (with comparison.py and privacy.py) the detailed ones, in report order; render.py turns them
into Markdown and HTML; `write_report` here writes both.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from common.atomic_files import atomic_write_text
from contract.run_layout import REPORT_HTML, REPORT_MD
from server.report.comparison import METRIC_LABELS
from server.report.figure_section import figures_section
from server.report.figures import plot_matrix, plot_per_round, plot_site_comparison
from server.report.privacy import privacy_audit_section
from server.report.records import LEFT_OUT_EVENTS, EvaluationResults, RunRecords, _epsilon_series, read_run
from server.report.render import Block, Figure, Section, Table, render_html, render_markdown
from server.report.sections import (
    build_sections,
    interim_line,
    latest_evaluation_table,
    participation_section,
)
from server.report.statistics import (
    MIN_WILCOXON_PAIRS,
    PairedTest,
    paired_wilcoxon,
    summary_cell,
    wilcoxon_line,
)
from server.report.summary import summary_section

__all__ = [
    "LEFT_OUT_EVENTS",
    "METRIC_LABELS",
    "MIN_WILCOXON_PAIRS",
    "Block",
    "EvaluationResults",
    "Figure",
    "PairedTest",
    "RunRecords",
    "Section",
    "Table",
    "_epsilon_series",
    "build_sections",
    "figures_section",
    "interim_line",
    "latest_evaluation_table",
    "paired_wilcoxon",
    "participation_section",
    "plot_matrix",
    "plot_per_round",
    "plot_site_comparison",
    "privacy_audit_section",
    "read_run",
    "render_html",
    "render_markdown",
    "summary_cell",
    "summary_section",
    "wilcoxon_line",
    "write_report",
]


def write_report(run_dir: Path, after_round: int | None = None) -> tuple[Path, Path]:
    """Render ``report.md`` and ``report.html`` (and ``figures/``) of a run directory; returns both paths.

    ``after_round``: write the interim report of a run still going on (after that round's evaluation);
    it reads only config.json and metrics.jsonl (an evaluation.json of an earlier, extended run is ignored)
    and evaluates no model, so the coordinator can afford it every ``eval-every`` rounds.
    """
    records = read_run(Path(run_dir))
    title = f"neurofed run {records.root.name}"
    if after_round is not None:
        records = replace(records, evaluation=None)
        title += f": {interim_line(after_round, int(records.run_config.get('num_rounds', 0)))}"
    sections = build_sections(records, after_round)
    markdown, page = records.root / REPORT_MD, records.root / REPORT_HTML
    atomic_write_text(markdown, render_markdown(title, sections))
    atomic_write_text(page, render_html(title, sections))
    return markdown, page
