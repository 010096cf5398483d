"""The report's first section: the answer in ten seconds.

- the unseen site(s): mean Dice of the federated model vs the best and worst local-only models, pooled,
  any further model evaluation.json scored (the starting model, the same configuration without DP) and
  chance, with the median
  paired difference and the Wilcoxon signed-rank p of federated vs each, and where evaluation.json has
  them each model's Dice on the scans' own grid beside the working grid's partial-volume limit; on the
  training sites,
  federated vs each site's own local-only model;
- differential privacy: the run's DP line, and whether it holds a comparison with the same configuration
  without DP;
- who took part: per site its role, subjects, rounds in the model, the rounds it was left out of (and
  why), the ε it spent and the membership-inference AUC of the final model on it;
- the run: strategy, rounds and wall time (metrics.jsonl's first to last event).

An interim report (or a finished run without evaluation.json) has no comparison yet: its summary gives the
sites' own evaluation of the global model in the last evaluated round instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from contract.evaluation import (
    FEDERATED,
    FEDERATED_WITHOUT_DP,
    LOCAL_PREFIX,
    POOLED,
    STARTING_KIND,
    local_model_name,
)
from contract.run_layout import EVALUATION_FILE
from contract.wire import ROLE_HOLDOUT
from server.report.comparison import model_label, unseen_verdict
from server.report.privacy import Epsilon, dp_line, epsilon_cell, epsilon_header
from server.report.records import LEFT_OUT_EVENTS, EvaluationResults, RunRecords
from server.report.render import Block, Section, Table
from server.report.statistics import p_cell, paired_wilcoxon, summary_cell


def _difference_cells(results: EvaluationResults, site: str, model: str) -> list[str]:
    """``federated - model`` (median over paired subjects) and the Wilcoxon p, as two table cells."""
    test = paired_wilcoxon(results.mean_dice(FEDERATED, site), results.mean_dice(model, site))
    if test.median_difference is None:
        return ["n/a", p_cell(test)]
    return [f"{test.median_difference:+.3f}", p_cell(test)]


def _unseen_rows(results: EvaluationResults, site: str) -> list[list[str]]:
    """The summary table's rows of one unseen site, federated first; a last column on the scans' own grid
    where evaluation.json scored them there."""
    means = {m: float(np.mean(v)) for m in results.local_models if (v := results.mean_dice(m, site))}
    ranked = sorted(means, key=means.__getitem__, reverse=True)
    if len(ranked) > 1:
        named = [(f"best local-only ({_trained_on(ranked[0])})", ranked[0])]
        named.append((f"worst local-only ({_trained_on(ranked[-1])})", ranked[-1]))
    else:
        named = [(model_label(m), m) for m in ranked]
    named += [(POOLED, m) for m in results.pooled]
    named += [(_other_label(results, m), m) for m in results.other_models if results.mean_dice(m, site)]
    native = results.own_grid_differs(site)

    def row(label: str, model: str, *differences: str) -> list[str]:
        cells = [label, summary_cell(results.mean_dice(model, site)), *(differences or ("", ""))]
        return cells + ([summary_cell(results.native_mean_dice(model, site))] if native else [])

    rows = [row(FEDERATED, FEDERATED)]
    rows += [row(label, m, *_difference_cells(results, site, m)) for label, m in named]
    if STARTING_KIND not in results.kinds.values():
        starting = f"not scored ({EVALUATION_FILE} has no such model)"
        rows.append(["starting model (initial weights)", starting, "", ""] + ([""] if native else []))
    if results.chance(site):
        rows.append(["chance level (random labels)", f"{np.mean(results.chance(site)):.3f}", "", ""])
        rows[-1] += [""] if native else []
    if native:
        ceiling = summary_cell(results.native_ceiling(site))
        rows.append(["perfect on the working grid (partial-volume limit)", "1", "", "", ceiling])
    return rows


def _other_label(results: EvaluationResults, model: str) -> str:
    """A further model's row: its name, and its kind where that says more (``starting model``)."""
    kind = results.kinds[model]
    if kind == STARTING_KIND:
        return f"{model} (starting model)" if model != kind else "starting model"
    return model if kind == model else f"{model} ({kind})"


def _trained_on(local_model: str) -> str:
    return local_model.removeprefix(LOCAL_PREFIX)


def _unseen_blocks(results: EvaluationResults, site: str) -> list[Block]:
    n = len(results.mean_dice(FEDERATED, site))
    header = ["model", "mean Dice", "federated − model", "Wilcoxon"]
    text = (
        f"Unseen site {site} (never trained, {n} test subjects). {unseen_verdict(results, site)} Below: "
        "mean ± sd (median) over subjects; federated − model: median paired difference; two-sided "
        "Wilcoxon signed-rank test."
    )
    if results.own_grid_differs(site):
        header.append(f"mean Dice, scan's own grid ({_spacing_text(results)})")
        text += (
            " Mean Dice is scored on the working grid; the last column scores each model as a site's "
            "`neurofed segment` output, on the scan's own voxels against its own label map."
        )
    elif results.native_ceiling(site):
        text += (
            " Scored on each scan's own voxels too, as a site's `neurofed segment` output: the same figures "
            "(the scans lie on the working grid)."
        )
    return [text, Table(header, _unseen_rows(results, site))]


def _spacing_text(results: EvaluationResults) -> str:
    """The scored scans' voxel size: ``1 mm`` when all share one isotropic size, else ``voxel sizes of their own``."""
    spacings = results.native_spacings()
    if len(spacings) == 1 and len(set(next(iter(spacings)))) == 1:
        return f"{next(iter(spacings))[0]:g} mm"
    return "voxel sizes of their own"


def _training_sites_line(results: EvaluationResults, trainers: Sequence[str]) -> str:
    """Federated vs each training site's own local-only model on that site's test split, pooled."""
    fed = [d for s in trainers for d in results.mean_dice(FEDERATED, s)]
    local = [d for s in trainers for d in results.mean_dice(local_model_name(s), s)]
    if not fed or len(fed) != len(local):
        return "Training sites: no paired federated and local-only scores on their test splits."
    test = paired_wilcoxon(fed, local)
    line = (
        f"Training sites' own test splits ({len(fed)} subjects): federated {np.mean(fed):.3f} vs each "
        f"site's own local-only model {np.mean(local):.3f}"
    )
    pooled = [d for s in trainers for d in results.mean_dice(POOLED, s)] if results.pooled else []
    line += f", pooled {np.mean(pooled):.3f}" if pooled else ""
    return f"{line}; federated − local-only median {test.median_difference:+.3f}, Wilcoxon {p_cell(test)}."


def _comparison_blocks(records: RunRecords, results: EvaluationResults) -> list[Block]:
    blocks: list[Block] = []
    for site in records.unseen_sites():
        blocks += _unseen_blocks(results, site)
    if not records.unseen_sites():
        blocks.append("No unseen site in this run: generalization to a new scanner is not measured.")
    blocks.append(_training_sites_line(results, records.training_sites()))
    return blocks


def _last_evaluation_line(records: RunRecords, after_round: int | None) -> str:
    """Without evaluation.json: the unseen sites' own evaluation of the global model, last round."""
    evaluated = [e for e in records.events if e.get("event") == "evaluate" and e.get("metrics")]
    why = (
        "interim report: the comparison with local-only and pooled models comes when the run has finished"
        if after_round is not None
        else f"{EVALUATION_FILE} is missing, so no comparison with local-only and pooled models; "
        f"{records.how_to_build()}"
    )
    if not evaluated:
        return f"No evaluation of the global model yet ({why})."
    last = max(int(e["round"]) for e in evaluated)
    rows = [e for e in evaluated if int(e["round"]) == last and e.get("model", "global") == "global"]
    unseen = [e for e in rows if e.get("role") == ROLE_HOLDOUT] or rows

    def dice(e: Mapping[str, Any]) -> str:
        value = e["metrics"].get("dice-mean")
        return "n/a" if value is None else f"{value:.3f}"

    scores = ", ".join(f"{e['site']} {dice(e)}" for e in sorted(unseen, key=lambda e: e["site"]))
    kind = "unseen site(s)" if unseen is not rows else "sites"
    return f"Global model after round {last}, mean Dice on the {kind}' test splits: {scores} ({why})."


def _dp_comparison_line(records: RunRecords, epsilon: Epsilon) -> str:
    """What DP cost in Dice: the DP model vs the same configuration without DP, on the unseen sites."""
    if (
        not (records.run_config.get("dp") or epsilon)
        and (records.run_config.get("server_dp") or "off") == "off"
    ):
        return "DP vs no DP: not applicable, this run trained without DP."
    results = EvaluationResults(records.evaluation) if records.evaluation is not None else None
    unseen = records.unseen_sites()
    if results is None or FEDERATED_WITHOUT_DP not in results.kinds or not unseen:
        return (
            "DP vs the same configuration without DP: not measured in this run; `neurofed simulate "
            "--compare-without-dp` trains that arm beside the DP run."
        )
    with_dp = [d for s in unseen for d in results.mean_dice(FEDERATED, s)]
    without = [d for s in unseen for d in results.mean_dice(FEDERATED_WITHOUT_DP, s)]
    test = paired_wilcoxon(with_dp, without)
    ratio = np.mean(with_dp) / np.mean(without) if np.mean(without) > 0 else float("nan")
    return (
        f"DP vs the same configuration without DP, unseen site(s) ({len(with_dp)} subjects): mean Dice "
        f"{np.mean(with_dp):.3f} with DP vs {np.mean(without):.3f} without ({ratio:.2f}x); DP − no DP median "
        f"{test.median_difference:+.3f}, Wilcoxon {p_cell(test)}."
    )


def _starting_model_line(records: RunRecords) -> str:
    """Which weights the run started from, what they were trained on, and whether the unseen site's figure
    is optimistic because the starting model saw its anatomy."""
    starting = records.document.get("starting_model")
    if not starting:
        return "Starting model: none (random initial weights from the run seed)."
    public = (
        "public anatomy only, ε = 0 for every site" if starting.get("public_data_only") else "not public data"
    )
    maps = starting.get("label_maps") or []
    line = (
        f"Starting model: {starting.get('file')} (sha256 {str(starting.get('sha256'))[:12]}…), pretrained on "
        f"{public}: {len(maps)} label map(s) and {starting.get('phantoms', 0)} built-in phantom(s)"
    )
    seen = (records.evaluation or {}).get("starting_model_anatomy") or {}
    if seen.get("optimistic"):
        what = ", ".join(seen.get("label_maps") or []) or ""
        what = (what + " and " if what and seen.get("phantom") else what) + (
            "the built-in phantom generator" if seen.get("phantom") else ""
        )
        line += (
            f". Caution: this study's sites are synthesized from anatomy the starting model was trained on "
            f"({what}), so the unseen-site figures are optimistic"
        )
    return line + "."


def _rounds_in_model(records: RunRecords, site: str) -> tuple[int, int]:
    """(rounds whose released global model holds the site's update, rounds aggregated so far)."""
    aggregated = {int(e["round"]) for e in records.events if e.get("event") == "aggregate-train"}
    released = {
        int(e["round"])
        for e in records.events
        if e.get("event") == "aggregate-train" and not e.get("skipped")
    }
    trained = {int(e["round"]) for e in records.events if e.get("event") == "train" and e.get("site") == site}
    rejected = {
        int(e["round"]) for e in records.events if e.get("event") == "rejected" and e.get("site") == site
    }
    return len((trained - rejected) & released), len(aggregated)


def _left_out_cell(records: RunRecords, site: str) -> str:
    left = [e for e in records.events if e.get("event") in LEFT_OUT_EVENTS and e.get("site") == site]
    return ", ".join(f"{e['event']} (round {e.get('round')})" for e in left) or "none"


def _audit_aucs(records: RunRecords) -> dict[str, float | None]:
    audit = (records.evaluation or {}).get("membership_audit") or {}
    return {g["name"]: g.get("auc") for g in audit.get("sites", [])}


def _site_row(
    records: RunRecords, epsilon: Epsilon, site: Mapping[str, Any], aucs: Mapping[str, Any]
) -> list[str]:
    name = site["site"]
    subjects = f"{site.get('num_train', '?')} / {site.get('num_test', '?')}"
    if site["role"] == ROLE_HOLDOUT:
        return [name, "unseen", subjects, "never trains", "—", "—", "reference (non-members)"]
    contributed, rounds = _rounds_in_model(records, name)
    auc = aucs.get(name)
    if records.evaluation is None:
        auc_cell = "after the run"
    else:
        auc_cell = "not measured" if auc is None else f"{auc:.2f}"
    return [
        name,
        "training",
        subjects,
        f"{contributed} of {rounds}",
        _left_out_cell(records, name),
        epsilon_cell(records, epsilon, name),
        auc_cell,
    ]


def _sites_blocks(records: RunRecords, epsilon: Epsilon) -> list[Block]:
    """Who took part: a row per site, and the pooled membership-inference AUC."""
    aucs = _audit_aucs(records)
    header = [
        "site",
        "role",
        "subjects train / test",
        "rounds in the model",
        "left out",
        epsilon_header(records),
    ]
    header.append("membership-inference AUC")
    table = Table(header, [_site_row(records, epsilon, s, aucs) for s in records.sites()])
    pooled = ((records.evaluation or {}).get("membership_audit") or {}).get("pooled") or {}
    note = (
        "Membership-inference AUC: can a loss-threshold attack on the final model tell a site's training "
        "subjects from its test subjects (0.5: chance, 1: always)"
    )
    if pooled.get("auc") is not None:
        note += f"; pooled over the training sites {pooled['auc']:.2f} ({pooled.get('n_members')} members)"
    return [table, note + "."]


def _wall_time(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _run_line(records: RunRecords) -> str:
    """Strategy, rounds and the wall time of the federated rounds."""
    c = records.run_config
    times = [float(e["time"]) for e in records.events if isinstance(e.get("time"), int | float)]
    finished = any(e.get("event") == "finished" for e in records.events)
    line = f"Run: {c.get('strategy')}, {c.get('num_rounds')} rounds x {c.get('local_steps')} local steps"
    if len(times) < 2:
        return line + "; wall time not recorded in metrics.jsonl."
    return (
        f"{line}; wall time {'' if finished else 'so far '}{_wall_time(max(times) - min(times))} "
        "(metrics.jsonl, first to last event; the comparison models and their evaluation not included)."
    )


def summary_section(records: RunRecords, epsilon: Epsilon, after_round: int | None) -> Section:
    """The report's first section (HTML id ``summary``): the answer, privacy, who took part, wall time."""
    blocks: list[Block] = []
    if records.evaluation is not None and after_round is None:
        blocks += _comparison_blocks(records, EvaluationResults(records.evaluation))
    else:
        blocks.append(_last_evaluation_line(records, after_round))
    blocks += [
        dp_line(records, epsilon),
        _dp_comparison_line(records, epsilon),
        _starting_model_line(records),
    ]
    blocks += _sites_blocks(records, epsilon)
    blocks.append(_run_line(records))
    return Section("Summary", blocks, anchor="summary")
