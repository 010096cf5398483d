"""The report of a federated run: ``report.md`` and ``report.html`` from the files of its run directory.

Reads only the run directory (the coordinator never needs the sites' data):

- ``config.json``: the run's settings and its sites;
- ``metrics.jsonl``: per-round events (test Dice per site per round; ``epsilon`` per site per round once
  differential privacy is on);
- ``evaluation.json`` (study/study_evaluation.py): per model, site and subject, Dice / HD95 (mm) /
  ASSD (mm) / |volume difference| (mL) per class, for the federated, local-only and pooled models.

Writes ``report.md`` and ``report.html`` (the same content; the HTML needs nothing but the image files
beside it) and the figures under ``figures/``; QC images are those evaluation.json lists under ``qc/``.

The statistics: per-subject mean Dice is the mean over the protocol's foreground classes of one subject's
Dice; tables give mean ± sd (median) over subjects, skipping undefined distances (a class missing from a
prediction). Federated vs local-only is a two-sided Wilcoxon signed-rank test (scipy) on paired
per-subject mean Dice.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import NeurofedError

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIGURES_DIR = "figures"
EVALUATION_FILE = "evaluation.json"
FEDERATED = "federated"
POOLED = "pooled"
LOCAL_PREFIX = "local-only:"
PERSONALISED = "personalised"
"""FedBN: each training site's personalised model (its normalization layers + the global rest), scored on
its own test split only (evaluation.json model ``personalised``)."""
ROLE_HOLDOUT = "holdout"
MIN_WILCOXON_PAIRS = 6
"""Below 6 pairs the exact two-sided signed-rank p-value cannot fall below 0.05 (its minimum is 2 / 2^n)."""
METRIC_LABELS = {
    "dice": "Dice",
    "hd95_mm": "HD95 (mm)",
    "assd_mm": "ASSD (mm)",
    "abs_volume_diff_ml": "|ΔV| (mL)",
}


# --- the report as data, rendered twice -------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Figure:
    """An image file, ``path`` relative to the run directory."""

    path: str
    caption: str


Block = str | Table | Figure
"""A paragraph (str), a table or a figure."""


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2


def _md_row(cells: Sequence[str]) -> str:
    # A pipe inside a cell (|ΔV|) would split it: escaped as GitHub-flavoured Markdown expects.
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"{'#' * section.level} {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines.append(_md_row(block.header))
                lines.append("|" + "---|" * len(block.header))
                lines += [_md_row(row) for row in block.rows]
            elif isinstance(block, Figure):
                lines.append(f"![{block.caption}]({block.path})")
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
    "text-align:right}th{background:#eee}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%}figure{margin:1em 0}figcaption{font-size:90%;color:#555}"
)


def render_html(title: str, sections: Sequence[Section]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h{section.level}>{esc(section.title)}</h{section.level}>")
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in block.header))
                parts.append("</tr></thead><tbody>")
                for row in block.rows:
                    parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
                parts.append("</tbody></table>")
            elif isinstance(block, Figure):
                parts.append(
                    f'<figure><img src="{esc(block.path)}" alt="{esc(block.caption)}">'
                    f"<figcaption>{esc(block.caption)}</figcaption></figure>"
                )
            else:
                parts.append(f"<p>{esc(block)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --- reading the run directory -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecords:
    """What the report reads: config.json, the events of metrics.jsonl, evaluation.json (None if absent)."""

    root: Path
    document: dict[str, Any]
    events: list[dict[str, Any]]
    evaluation: dict[str, Any] | None

    @property
    def run_config(self) -> dict[str, Any]:
        return self.document["run_config"]

    def sites(self) -> list[dict[str, Any]]:
        return list(self.document.get("sites", []))


def read_run(run_dir: Path) -> RunRecords:
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise NeurofedError(
            f"{run_dir} is not a run directory (config.json is missing): pass the folder a run wrote with --out"
        )
    events = []
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of an interrupted run
    evaluation_path = run_dir / EVALUATION_FILE
    evaluation = json.loads(evaluation_path.read_text()) if evaluation_path.is_file() else None
    return RunRecords(run_dir, json.loads(config_path.read_text()), events, evaluation)


# --- statistics -------------------------------------------------------------------------------------------


def _values(xs: Sequence[float | None]) -> np.ndarray:
    arr = np.array([np.nan if x is None else float(x) for x in xs], dtype=float)
    return arr[np.isfinite(arr)]


def summary_cell(xs: Sequence[float | None], digits: int = 3) -> str:
    """``mean ± sd (median)`` of the finite values, with ``n=`` when some were undefined; ``n/a`` if none."""
    finite = _values(xs)
    if finite.size == 0:
        return "n/a"
    text = f"{finite.mean():.{digits}f}"
    if finite.size > 1:
        text += f" ± {finite.std(ddof=1):.{digits}f}"
    text += f" ({np.median(finite):.{digits}f})"
    if finite.size < len(xs):
        text += f" n={finite.size}/{len(xs)}"
    return text


def wilcoxon_line(label: str, federated: Sequence[float], baseline: Sequence[float]) -> str:
    """One sentence: the two-sided Wilcoxon signed-rank test on paired values, or why it does not apply."""
    a, b = np.asarray(federated, dtype=float), np.asarray(baseline, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(a.size)
    head = f"Wilcoxon signed-rank test, {label}, per-subject mean Dice: n = {n} pairs"
    if n == 0:
        return f"{head}; not applicable (no pairs)."
    diff = a - b
    median = f"median difference (federated - baseline) {np.median(diff):+.3f}"
    if n < MIN_WILCOXON_PAIRS:
        return (
            f"{head}, {median}; not applicable: fewer than {MIN_WILCOXON_PAIRS} pairs cannot reach p < 0.05 "
            "(use more test subjects)."
        )
    if np.all(diff == 0):
        return f"{head}; not applicable: every difference is zero."
    from scipy.stats import wilcoxon

    result = wilcoxon(a, b, alternative="two-sided")
    return f"{head}, {median}, W = {result.statistic:.1f}, p = {result.pvalue:.3g}."


# --- figures ----------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=90, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_matrix(matrix: np.ndarray, rows: Sequence[str], columns: Sequence[str], path: Path) -> None:
    """Heatmap of mean Dice, models (rows) x test sites (columns), annotated."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 1.0 + 0.5 * len(rows)))
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), value in np.ndenumerate(matrix):
        if math.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set_xlabel("test site")
    ax.set_title("mean Dice on each site's test split")
    fig.colorbar(image, ax=ax, label="mean Dice")
    _save_figure(fig, path)
    plt.close(fig)


def plot_per_round(
    series: Mapping[str, Sequence[tuple[int, float]]], ylabel: str, title: str, path: Path
) -> None:
    """One line per label of ``(round, value)`` points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, points in sorted(series.items()):
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", linestyle="--" if "unseen" in label else "-", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save_figure(fig, path)
    plt.close(fig)


# --- the report -------------------------------------------------------------------------------------------


def _epsilon_series(events: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for e in events:
        if "site" not in e:
            continue
        eps = e.get("epsilon", (e.get("metrics") or {}).get("epsilon"))
        if isinstance(eps, int | float) and math.isfinite(eps):
            series.setdefault(str(e["site"]), []).append((int(e["round"]), float(eps)))
    return {site: sorted(dict(points).items()) for site, points in series.items()}


def _dp_line(records: RunRecords, epsilon: Mapping[str, Sequence[tuple[int, float]]]) -> str:
    subject_level = bool(records.run_config.get("dp")) or bool(epsilon)
    server_dp = records.run_config.get("server_dp") or "off"
    if not subject_level and server_dp == "off":
        return "Differential privacy: OFF (the model updates sites send carry no formal privacy guarantee)."
    parts = []
    if subject_level:
        final = [points[-1][1] for points in epsilon.values() if points]
        delta = records.run_config.get("dp_delta")
        text = "subject-level DP-SGD at the sites"
        text += f", largest final ε over sites {max(final):.3g}" if final else ""
        parts.append(text + (f", δ = {delta:g}" if delta else ""))
    if server_dp != "off":
        # A noised aggregate at the coordinator protects whole sites, not a site's subjects.
        parts.append(f"site-level DP at the coordinator ({server_dp} clipping)")
    return "Differential privacy: ON (" + "; ".join(parts) + ")."


def _settings_line(records: RunRecords) -> str:
    c = records.run_config
    sites = records.sites()
    train = [s["site"] for s in sites if s["role"] != ROLE_HOLDOUT]
    unseen = [s["site"] for s in sites if s["role"] == ROLE_HOLDOUT]
    return (
        f"Strategy {c.get('strategy')}, {c.get('num_rounds')} rounds x {c.get('local_steps')} local steps; "
        f"{len(train)} training site(s) ({', '.join(train)}) and {len(unseen)} unseen site(s) "
        f"({', '.join(unseen) or 'none'}); label protocol {c.get('protocol')}; network "
        f"{c.get('architecture')} ({c.get('network_preset')}); patch {c.get('patch_size')}^3 voxels, batch "
        f"{c.get('batch_size')}, learning rate {c.get('learning_rate')}; {c.get('spacing_mm')} mm voxels; "
        f"test fraction {c.get('test_fraction')}; seed {c.get('seed')}."
    )


class _Results:
    """Per-subject results of evaluation.json, indexed by (model, site)."""

    def __init__(self, evaluation: Mapping[str, Any]) -> None:
        self.evaluation = evaluation
        self.classes: list[str] = list(evaluation["classes"])
        self.metrics: list[str] = list(evaluation["metrics"])
        self.models: list[str] = [m["name"] for m in evaluation["models"]]
        self.by: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in evaluation["results"]:
            self.by.setdefault((r["model"], r["site"]), []).append(r)
        for rows in self.by.values():
            rows.sort(key=lambda r: r["subject"])

    def mean_dice(self, model: str, site: str) -> list[float]:
        return [r["mean_dice"] for r in self.by.get((model, site), [])]

    def metric(self, model: str, site: str, cls: str, metric: str) -> list[float | None]:
        return [r["metrics"][cls][metric] for r in self.by.get((model, site), [])]

    def chance(self, site: str) -> list[float]:
        for s in self.evaluation["sites"]:
            if s["site"] == site:
                return list((s.get("chance_mean_dice") or {}).values())
        return []


def _model_label(name: str) -> str:
    if name == PERSONALISED:
        return "personalised (own site's normalization layers)"
    return name.removeprefix(LOCAL_PREFIX) + " (local-only)" if name.startswith(LOCAL_PREFIX) else name


def _class_table(results: _Results, site: str, models: Sequence[str]) -> Table:
    header = ["class", "metric"] + [_model_label(m) for m in models]
    rows = [["all (mean over classes)", "Dice"] + [summary_cell(results.mean_dice(m, site)) for m in models]]
    for cls in results.classes:
        for metric in results.metrics:
            rows.append(
                [cls, METRIC_LABELS.get(metric, metric)]
                + [summary_cell(results.metric(m, site, cls, metric)) for m in models]
            )
    return Table(header, rows)


def privacy_audit_section(records: RunRecords, epsilon: Mapping[str, Sequence[tuple[int, float]]]) -> Section:
    """The membership-inference audit of the final model (evaluation.json ``membership_audit``), per training
    site beside the ε it spent."""
    section = Section("Privacy audit")
    audit = (records.evaluation or {}).get("membership_audit")
    if not audit:
        section.blocks.append(
            "Not measured: evaluation.json holds no membership audit (missing, or written before the audit "
            f"existed); build it with `neurofed report {records.root} --re-evaluate`."
        )
        return section
    settings = audit.get("settings", {})
    fpr_target = settings.get("reference_fpr", 0.1)
    reference = ", ".join(audit.get("reference_sites") or []) or "none"
    section.blocks.append(
        "Membership-inference attacks on the final global model: from the model's loss on a subject (mean "
        f"Dice + CE over {settings.get('patches_per_subject')} fixed patches), can an attacker tell a site's "
        "training subjects (members) from its held-out test subjects (non-members)? Loss-threshold AUC: "
        "0.5 is chance, 1.0 tells them apart perfectly. Calibrated attack: the loss threshold is set on the "
        f"unseen site(s) ({reference}), known non-members, for at most {fpr_target:.0%} false positives "
        "there; TPR is the share of the site's members below it, FPR the share of its own non-members, "
        "advantage = TPR - FPR. With n members and m non-members the AUC takes only n x m + 1 values: "
        "per-site values are coarse, the pooled row less so. The unseen site also has another scanner, so "
        "'AUC members vs unseen' measures site shift as well as membership; the loss-threshold AUC, within "
        "a site, does not."
    )
    dp_on = bool(records.run_config.get("dp"))
    delta = records.run_config.get("dp_delta")

    def eps_cell(site: str) -> str:
        points = epsilon.get(site)
        if points:
            return f"{points[-1][1]:.3g}"
        return "DP on, none reported" if dp_on else "no DP"

    def num(value: float | None, digits: int = 2) -> str:
        return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"

    rows = []
    groups = [(g, eps_cell(g["name"])) for g in audit.get("sites", [])]
    if audit.get("pooled"):
        finals = [epsilon[g["name"]][-1][1] for g in audit.get("sites", []) if epsilon.get(g["name"])]
        groups.append((audit["pooled"], f"max {max(finals):.3g}" if finals else eps_cell("")))
    for group, eps in groups:
        calibrated = group.get("calibrated") or {}
        rows.append(
            [
                group["name"],
                eps,
                str(group["n_members"]),
                str(group["n_nonmembers"]),
                num(group.get("auc")),
                num(calibrated.get("tpr")),
                num(calibrated.get("fpr")),
                num(calibrated.get("advantage")),
                num(calibrated.get("auc_members_vs_reference")),
            ]
        )
    eps_header = f"ε spent (δ = {delta:g})" if delta else "ε spent"
    section.blocks.append(
        Table(
            [
                "training site",
                eps_header,
                "members",
                "non-members",
                "loss-threshold AUC",
                "calibrated TPR",
                "calibrated FPR",
                "advantage",
                "AUC members vs unseen",
            ],
            rows,
        )
    )
    return section


LEFT_OUT_EVENTS: dict[str, str] = {
    "refused": "declined by the site (e.g. its privacy budget, or DP required)",
    "rejected": "update rejected by the coordinator (NaN/Inf or norm outlier)",
    "dropped": "failed or did not answer in time",
}


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
        return Section("Participation", ["Every training site contributed to every round."])
    legend = "; ".join(f"{k}: {v}" for k, v in LEFT_OUT_EVENTS.items())
    return Section(
        "Participation",
        [
            f"Sites left out of a round ({legend}); the round went on with the others.",
            Table(["round", "site", "what", "reason"], rows),
        ],
    )


def interim_line(after_round: int, num_rounds: int) -> str:
    """The line an interim report (written while the run goes on) starts with."""
    return f"interim report after round {after_round} of {num_rounds}"


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
                str(e["metrics"].get("num-examples", "")),
                cell(e["metrics"].get("dice-mean")),
                *(cell(e["metrics"].get(f"dice-{c}")) for c in classes),
            ]
            for e in sorted(rows, key=lambda e: (e["site"], e.get("model", "global")))
        ],
    )
    return [f"The sites' own evaluation after round {last} (mean over each site's test subjects):", table]


def build_sections(records: RunRecords, after_round: int | None = None) -> list[Section]:
    """Every section of the report; writes the figures it references under ``RUN_DIR/figures``.

    ``after_round``: an interim report of a run still going on, from metrics.jsonl only (the comparison
    with local-only and pooled models comes at the end).
    """
    root = records.root
    sites = records.sites()
    site_ids = [s["site"] for s in sites]
    unseen = [s["site"] for s in sites if s["role"] == ROLE_HOLDOUT]
    trainers = [s for s in site_ids if s not in unseen]
    epsilon = _epsilon_series(records.events)

    overview = Section("Run", [_dp_line(records, epsilon), _settings_line(records)])
    sections = [overview]
    if after_round is not None:
        overview.blocks.append(
            f"This is an {interim_line(after_round, int(records.run_config.get('num_rounds', 0)))}: the "
            "sites' own evaluations so far (metrics.jsonl). The comparison with local-only and pooled "
            "models is added when the run has finished."
        )
    elif records.evaluation is not None:
        budget = records.evaluation.get("budget", {})
        overview.blocks.append(
            f"Comparison models trained with the same budget: {budget.get('rule', '')}. Federated: "
            f"{budget.get('federated_steps_per_site')} steps per site; local-only: "
            f"{budget.get('local_only_steps')} steps; pooled: {budget.get('pooled_steps')} steps. Metrics on "
            f"the {records.evaluation.get('grid', 'preprocessed grid')}; cells are mean ± sd (median) over "
            "test subjects."
        )
    else:
        overview.blocks.append(
            f"{EVALUATION_FILE} is missing: the comparison with local-only and pooled models was not run; "
            f"build it with `neurofed report {root}`."
        )
    sections.append(participation_section(records.events))
    if after_round is None:  # the audit runs with the final evaluation
        sections.append(privacy_audit_section(records, epsilon))

    if records.evaluation is not None:
        results = _Results(records.evaluation)
        locals_ = [m for m in results.models if m.startswith(LOCAL_PREFIX)]
        pooled = [m for m in results.models if m == POOLED]
        personalised = [m for m in results.models if m == PERSONALISED]

        sections.append(
            Section(
                "Per-site results (training sites' test splits)",
                ["Each training site: the federated model vs that site's own local-only model vs pooled."]
                + (
                    [
                        "FedBN: 'federated' is the global model (the averaged shared layers; its "
                        "normalization layers stay as initialised, since every site keeps its own); "
                        "'personalised' is that site's own model: its normalization layers with the global "
                        "rest. Personalised vs global shows what keeping the normalization local buys on the "
                        "site's own scanner."
                    ]
                    if personalised
                    else []
                ),
            )
        )
        for site in trainers:
            own = [m for m in locals_ if m == LOCAL_PREFIX + site]
            compared = [FEDERATED, *personalised, *own, *pooled]
            sections.append(Section(site, [_class_table(results, site, compared)], level=3))

        # Generalization matrix: models x every site.
        rows = [*locals_, *pooled, FEDERATED, *personalised]
        columns = [f"{s} (unseen)" if s in unseen else s for s in site_ids]
        matrix = np.array(
            [[np.mean(v) if (v := results.mean_dice(m, s)) else np.nan for s in site_ids] for m in rows]
        )
        heatmap = f"{FIGURES_DIR}/generalization_matrix.png"
        plot_matrix(matrix, [_model_label(m) for m in rows], columns, root / heatmap)
        sections.append(
            Section(
                "Generalization matrix (train site x test site)",
                [
                    "Mean over test subjects of the per-subject mean Dice; rows: the model (trained on), "
                    "columns: the site it is tested on. Unseen sites never trained."
                    + (
                        " The personalised row holds each training site's own personalised model on its own "
                        "test split (an unseen site has none)."
                        if personalised
                        else ""
                    ),
                    Table(
                        ["model \\ test site", *columns],
                        [
                            [_model_label(m), *(summary_cell(results.mean_dice(m, s)) for s in site_ids)]
                            for m in rows
                        ],
                    ),
                    Figure(heatmap, "Generalization matrix: mean Dice, model x test site"),
                ],
            )
        )

        tests = Section("Federated vs local-only (Wilcoxon signed-rank test)")
        all_fed: list[float] = []
        all_local: list[float] = []
        for site in trainers:
            fed, local = results.mean_dice(FEDERATED, site), results.mean_dice(LOCAL_PREFIX + site, site)
            if len(fed) == len(local):
                all_fed += fed
                all_local += local
            tests.blocks.append(wilcoxon_line(f"federated vs local-only on {site}", fed, local))
        tests.blocks.append(
            wilcoxon_line(
                "federated vs each site's own local-only model, pooled over training sites",
                all_fed,
                all_local,
            )
        )
        sections.append(tests)

        for site in unseen:
            section = Section(f"Unseen site {site} (never trained)")
            fed = results.mean_dice(FEDERATED, site)
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
            section.blocks.append(verdict + ".")
            section.blocks.append(_class_table(results, site, [FEDERATED, *locals_, *pooled]))
            for m in [*locals_, *pooled]:
                section.blocks.append(
                    wilcoxon_line(
                        f"federated vs {_model_label(m)} on unseen {site}", fed, results.mean_dice(m, site)
                    )
                )
            for qc in records.evaluation.get("qc", []):
                if qc["site"] == site:
                    section.blocks.append(
                        Figure(qc["file"], f"QC: federated model's segmentation of {site} {qc['subject']}")
                    )
            sections.append(section)

    # Dice per round from the sites' own evaluations during the run.
    dice: dict[str, list[tuple[int, float]]] = {}
    for e in records.events:
        if e.get("event") == "evaluate" and (e.get("metrics") or {}).get("dice-mean") is not None:
            label = e["site"] + (" (unseen)" if e.get("role") == ROLE_HOLDOUT else "")
            if e.get("model", "global") != "global":
                label += f" [{e['model']}]"
            dice.setdefault(label, []).append((int(e["round"]), float(e["metrics"]["dice-mean"])))
    rounds = Section("Training progress")
    latest = latest_evaluation_table(records.events)
    if latest is not None:
        rounds.blocks += latest
    if dice:
        path = f"{FIGURES_DIR}/dice_per_round.png"
        plot_per_round(
            dice, "mean Dice (test split)", "global model's test Dice per round and site", root / path
        )
        rounds.blocks.append(Figure(path, "Mean Dice of the global model per round, per site"))
    else:
        rounds.blocks.append("No evaluation events in metrics.jsonl.")
    if epsilon:
        path = f"{FIGURES_DIR}/epsilon_per_round.png"
        plot_per_round(epsilon, "ε (cumulative)", "privacy loss per round and site", root / path)
        rounds.blocks.append(Figure(path, "ε per round, per site"))
    sections.append(rounds)
    return sections


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
    outputs = []
    for name, text in (
        (REPORT_MD, render_markdown(title, sections)),
        (REPORT_HTML, render_html(title, sections)),
    ):
        path = records.root / name
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        outputs.append(path)
    return outputs[0], outputs[1]
