"""The report's sections, one function each, and `build_sections`, which lists them in report order:
the summary (server/report/summary.py), the figures (server/report/figure_section.py), then the detailed
sections, collapsed in the HTML.

The detailed sections from metrics.jsonl (the run, participation, training progress) are here; those from
evaluation.json are in server/report/comparison.py and the privacy audit in server/report/privacy.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from contract.run_layout import EVALUATION_FILE
from contract.wire import ROLE_HOLDOUT, WEIGHT_KEY
from server.report.comparison import (
    generalization_section,
    per_site_sections,
    unseen_site_section,
    wilcoxon_section,
)
from server.report.figure_section import figures_section
from server.report.privacy import privacy_audit_section
from server.report.records import LEFT_OUT_EVENTS, EvaluationResults, RunRecords, _epsilon_series
from server.report.render import Block, Section, Table
from server.report.summary import summary_section


def interim_line(after_round: int, num_rounds: int) -> str:
    """The line an interim report (written while the run goes on) starts with."""
    return f"interim report after round {after_round} of {num_rounds}"


def _settings_line(records: RunRecords) -> str:
    c = records.run_config
    train, unseen = records.training_sites(), records.unseen_sites()
    return (
        f"Strategy {c.get('strategy')}, {c.get('num_rounds')} rounds x {c.get('local_steps')} local steps; "
        f"{len(train)} training site(s) ({', '.join(train)}) and {len(unseen)} unseen site(s) "
        f"({', '.join(unseen) or 'none'}); label protocol {c.get('protocol')}; network "
        f"{c.get('architecture')} ({c.get('network_preset')}); patch {c.get('patch_size')}^3 voxels, batch "
        f"{c.get('batch_size')}, learning rate {c.get('learning_rate')}; {c.get('spacing_mm')} mm voxels; "
        f"test fraction {c.get('test_fraction')}; seed {c.get('seed')}; label-map post-processing "
        f"{c.get('postprocessing', 'none')} (every model's Dice is measured after it)."
    )


def _comparison_line(records: RunRecords, after_round: int | None) -> str:
    """What the report compares: nothing yet (interim), the budget of the comparison models, or how to add
    them."""
    if after_round is not None:
        return (
            f"This is an {interim_line(after_round, int(records.run_config.get('num_rounds', 0)))}: the "
            "sites' own evaluations so far (metrics.jsonl). The comparison with local-only and pooled "
            "models is added when the run has finished."
        )
    if records.evaluation is not None:
        budget = records.evaluation.get("budget", {})
        return (
            f"Comparison models trained with the same budget: {budget.get('rule', '')}. Federated: "
            f"{budget.get('federated_steps_per_site')} steps per site; local-only: "
            f"{budget.get('local_only_steps')} steps; pooled: {budget.get('pooled_steps')} steps. Metrics on "
            f"the {records.evaluation.get('grid', 'preprocessed grid')}; cells are mean ± sd (median) over "
            "test subjects."
        )
    return (
        f"{EVALUATION_FILE} is missing: the comparison with local-only and pooled models was not run; "
        f"{records.how_to_build()}."
    )


def run_section(records: RunRecords, after_round: int | None) -> Section:
    """The run: its settings and what the report compares (its privacy is in the summary)."""
    return Section("Run", [_settings_line(records), _comparison_line(records, after_round)], collapsed=True)


def participation_section(events: Sequence[Mapping[str, Any]]) -> Section:
    """Which sites were left out of which round, and why (``refused``/``rejected``/``dropped`` events)."""
    rows = [
        [
            str(e.get("round", "")),
            str(e.get("site", "")),
            str(e["event"]) + (f" ({e['stage']})" if e.get("stage") else ""),
            str(e.get("reason", "")),
        ]
        for e in events
        if e.get("event") in LEFT_OUT_EVENTS
    ]
    if not rows:
        return Section("Participation", ["Every training site contributed to every round."], collapsed=True)
    legend = "; ".join(f"{k}: {v}" for k, v in LEFT_OUT_EVENTS.items())
    return Section(
        "Participation",
        [
            f"Sites left out of a round ({legend}); the round went on with the others.",
            Table(["round", "site", "what", "reason"], rows),
        ],
        collapsed=True,
    )


def latest_evaluation_table(events: Sequence[Mapping[str, Any]]) -> list[Block] | None:
    """The sites' own evaluation of the last evaluated round: per site and model (global; FedBN's
    personalised), mean over the site's test subjects of the mean Dice and of each class's Dice."""
    evaluated = [e for e in events if e.get("event") == "evaluate" and e.get("metrics")]
    if not evaluated:
        return None
    last = max(int(e["round"]) for e in evaluated)
    rows = [e for e in evaluated if int(e["round"]) == last]
    classes = [
        k.removeprefix("dice-") for k in rows[0]["metrics"] if k.startswith("dice-") and k != "dice-mean"
    ]

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"

    table = Table(
        ["site", "role", "model", "test subjects", "mean Dice", *(f"Dice {c}" for c in classes)],
        [
            [
                e["site"],
                "unseen" if e.get("role") == ROLE_HOLDOUT else "training",
                str(e.get("model", "global")),
                str(e["metrics"].get(WEIGHT_KEY, "")),
                cell(e["metrics"].get("dice-mean")),
                *(cell(e["metrics"].get(f"dice-{c}")) for c in classes),
            ]
            for e in sorted(rows, key=lambda e: (e["site"], e.get("model", "global")))
        ],
    )
    return [f"The sites' own evaluation after round {last} (mean over each site's test subjects):", table]


def training_progress_section(records: RunRecords) -> Section:
    """The sites' own evaluation of the last evaluated round (the per-round plots are among the figures)."""
    latest = latest_evaluation_table(records.events)
    blocks = latest if latest is not None else ["No evaluation events in metrics.jsonl."]
    return Section("Training progress", blocks, collapsed=True)


def build_sections(records: RunRecords, after_round: int | None = None) -> list[Section]:
    """Every section of the report; writes the figures it references under ``RUN_DIR/figures``.

    The summary and the figures first, then the details (collapsed in HTML): the run, participation,
    the privacy audit, the per-site, generalization, Wilcoxon and unseen-site tables, training progress.
    ``after_round``: an interim report of a run still going on, from metrics.jsonl only (the comparison
    with local-only and pooled models comes at the end).
    """
    epsilon = _epsilon_series(records.events)
    trainers, unseen = records.training_sites(), records.unseen_sites()
    sections = [summary_section(records, epsilon, after_round), figures_section(records, epsilon)]
    sections += [run_section(records, after_round), participation_section(records.events)]
    if after_round is None:  # the audit runs with the final evaluation
        sections.append(privacy_audit_section(records, epsilon))
    if records.evaluation is not None:
        results = EvaluationResults(records.evaluation)
        sections += per_site_sections(results, trainers)
        site_ids = [s["site"] for s in records.sites()]
        sections.append(generalization_section(results, site_ids, unseen))
        sections.append(wilcoxon_section(results, trainers))
        sections += [unseen_site_section(results, site) for site in unseen]
    sections.append(training_progress_section(records))
    return sections
