"""What the report says about privacy: the run's differential-privacy line (ε spent per site, from
metrics.jsonl) and the membership-inference audit of the final model (evaluation.json)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from server.report.records import RunRecords
from server.report.render import Section, Table

Epsilon = Mapping[str, Sequence[tuple[int, float]]]
"""Per site, its ``(round, ε)`` points in round order (`records._epsilon_series`)."""


def dp_line(records: RunRecords, epsilon: Epsilon) -> str:
    """One sentence: whether the run had differential privacy, at the sites and/or at the coordinator."""
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
        parts.append(_site_level_text(records, server_dp))
    return "Differential privacy: ON (" + "; ".join(parts) + ")."


def _site_level_text(records: RunRecords, server_dp: str) -> str:
    """Site-level DP as released: the mechanism, and the ε of the last released round's event."""
    text = (
        f"site-level DP at the coordinator ({server_dp} clipping): each released round is the uniform mean of "
        "the k accepted sites' clipped updates plus Gaussian noise of std z·C/k"
    )
    released = [e for e in records.events if "site_level_epsilon" in e]  # the aggregate-train events
    if released:
        last = released[-1]
        text += f", site-level ε = {float(last['site_level_epsilon']):.3g}"
        text += f" at δ = {last['site_level_delta']:g}" if last.get("site_level_delta") else ""
        if "site_level_releases" in last:
            text += f" after {last['site_level_releases']} released round(s)"
    return text


def epsilon_cell(records: RunRecords, epsilon: Epsilon, site: str) -> str:
    """A table cell of the ε a site spent: its last reported ε, or why there is none."""
    points = epsilon.get(site)
    if points:
        return f"{points[-1][1]:.3g}"
    return "DP on, none reported" if records.run_config.get("dp") else "no DP"


def epsilon_header(records: RunRecords) -> str:
    """The header of an ε column, with the run's δ when it has subject-level DP."""
    delta = records.run_config.get("dp_delta") if records.run_config.get("dp") else None
    return f"ε spent (δ = {delta:g})" if delta else "ε spent"


def _audit_intro(audit: Mapping[str, Any]) -> str:
    settings = audit.get("settings", {})
    fpr_target = settings.get("reference_fpr", 0.1)
    reference = ", ".join(audit.get("reference_sites") or []) or "none"
    return (
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


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _audit_row(group: Mapping[str, Any], eps: str) -> list[str]:
    calibrated = group.get("calibrated") or {}
    return [
        group["name"],
        eps,
        str(group["n_members"]),
        str(group["n_nonmembers"]),
        _num(group.get("auc")),
        _num(calibrated.get("tpr")),
        _num(calibrated.get("fpr")),
        _num(calibrated.get("advantage")),
        _num(calibrated.get("auc_members_vs_reference")),
    ]


def privacy_audit_section(records: RunRecords, epsilon: Epsilon) -> Section:
    """The membership-inference audit of the final model (evaluation.json ``membership_audit``), per training
    site beside the ε it spent."""
    section = Section("Privacy audit", collapsed=True)
    audit = (records.evaluation or {}).get("membership_audit")
    if not audit:
        section.blocks.append(
            "Not measured: evaluation.json holds no membership audit (missing, or written before the audit "
            f"existed); {records.how_to_build(re_evaluate=True)}."
        )
        return section
    section.blocks.append(_audit_intro(audit))
    groups = [(g, epsilon_cell(records, epsilon, g["name"])) for g in audit.get("sites", [])]
    if audit.get("pooled"):
        finals = [epsilon[g["name"]][-1][1] for g in audit.get("sites", []) if epsilon.get(g["name"])]
        groups.append(
            (audit["pooled"], f"max {max(finals):.3g}" if finals else epsilon_cell(records, epsilon, ""))
        )
    header = [
        "training site",
        epsilon_header(records),
        "members",
        "non-members",
        "loss-threshold AUC",
        "calibrated TPR",
        "calibrated FPR",
        "advantage",
        "AUC members vs unseen",
    ]
    section.blocks.append(Table(header, [_audit_row(group, eps) for group, eps in groups]))
    return section
