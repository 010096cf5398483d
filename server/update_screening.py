"""Screening of the sites' training replies before aggregation: what is aggregated, what is left out, why.

`screen_training_replies` sorts every training reply into one of three outcomes, each an event for
metrics.jsonl: ``train`` (offered and accepted), ``refused`` (the site declined the round, e.g. its
privacy budget) and ``rejected`` (the update fails `check_updates`: NaN/Inf, unknown arrays, or a norm far
above the other sites'). Only accepted replies reach the strategy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from contract.wire import ARRAYS_RECORD, METRICS_RECORD, REFUSAL_REASON, REFUSAL_RECORD, REFUSED_KEY


def check_float_arrays(arrays: ArrayRecord) -> None:
    """Raise ValueError naming any non-floating-point array: site-level DP noises every array it sends.

    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) cannot carry Gaussian noise; the networks
    here use InstanceNorm without running statistics, which has none.
    """
    integer = [k for k, a in arrays.items() if not np.issubdtype(np.dtype(a.numpy().dtype), np.floating)]
    if integer:
        raise ValueError(f"site-level DP needs floating-point arrays only; these are not: {integer}")


@dataclass(frozen=True)
class UpdateCheck:
    """The sanity verdict on one site's update.

    Attributes:
        index: position of the reply in the list checked.
        norm: L2 norm of (site arrays - global arrays) over all arrays the site sent; NaN if not finite.
        reason: why the update is rejected, or None when it is accepted.
    """

    index: int
    norm: float
    reason: str | None

    @property
    def accepted(self) -> bool:
        return self.reason is None


def update_norm(site_arrays: ArrayRecord, global_arrays: ArrayRecord) -> float:
    """L2 norm of ``site - global`` over the arrays the site sent (float64); NaN if any value is NaN/Inf."""
    total = 0.0
    for key, array in site_arrays.items():
        site = np.asarray(array.numpy(), dtype=np.float64)
        if not np.all(np.isfinite(site)):
            return math.nan
        total += float(np.sum((site - np.asarray(global_arrays[key].numpy(), dtype=np.float64)) ** 2))
    return math.sqrt(total)


def check_updates(
    updates: Sequence[ArrayRecord], global_arrays: ArrayRecord, norm_limit: float
) -> list[UpdateCheck]:
    """Sanity of each site's update before aggregation.

    Rules: an update holding NaN or Inf, or an array the global model lacks, is rejected. With
    ``norm_limit`` > 0 and at least two finite updates, update ``i`` is rejected when its norm exceeds
    ``norm_limit`` x the median norm of the *other* finite updates (compared with the others, so one huge
    update cannot raise its own yardstick; with a median of 0 the rule is skipped).
    """
    norms: list[float] = []
    reasons: list[str | None] = []
    for arrays in updates:
        unknown = sorted(set(arrays) - set(global_arrays))
        if unknown:
            norms.append(math.nan)
            reasons.append(f"arrays not in the global model: {unknown[:5]}")
            continue
        norm = update_norm(arrays, global_arrays)
        norms.append(norm)
        reasons.append("update contains NaN or Inf values" if math.isnan(norm) else None)
    finite = [i for i, n in enumerate(norms) if math.isfinite(n)]
    if norm_limit > 0 and len(finite) >= 2:
        for i in finite:
            median = float(np.median([norms[j] for j in finite if j != i]))
            if median > 0 and norms[i] > norm_limit * median:
                reasons[i] = (
                    f"update norm {norms[i]:.4g} is more than {norm_limit:g} x the median norm of the other "
                    f"sites' updates ({median:.4g})"
                )
    return [UpdateCheck(i, norms[i], reasons[i]) for i in range(len(updates))]


@dataclass
class ScreenedRound:
    """The outcome of one round's screening.

    Attributes:
        accepted: the replies to aggregate, in the order given.
        events: one metrics.jsonl event per reply (``train``, ``refused`` or ``rejected``), in order.
        refused / rejected: ``{"site", "reason"}`` of each reply left out, for the audit log.
        epsilon: ``{site: {"epsilon", "delta"}}`` the sites reported this round.
    """

    accepted: list[Message] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    epsilon: dict[str, Any] = field(default_factory=dict)


def screen_training_replies(
    server_round: int,
    replies: Sequence[Message],
    global_arrays: ArrayRecord,
    norm_limit: float,
    site_of: Callable[[Message], Mapping[str, str]],
) -> ScreenedRound:
    """Sort a round's training replies into accepted, refused and rejected (see the module docstring).

    Args:
        site_of: ``{"site", "role"}`` of a reply's sender.
    """
    out = ScreenedRound()
    offered: list[tuple[Message, dict[str, Any]]] = []
    for r in replies:
        site = site_of(r)
        metrics = dict(r.content[METRICS_RECORD])
        event: dict[str, Any] = {
            "event": "train",
            "round": server_round,
            "site": site["site"],
            "role": site["role"],
            "split": "train",
            "metrics": metrics,
        }
        if "epsilon" in metrics:
            event["epsilon"] = metrics["epsilon"]
            event["delta"] = metrics.get("delta")
            out.epsilon[site["site"]] = {"epsilon": metrics["epsilon"], "delta": metrics.get("delta")}
        if metrics.get(REFUSED_KEY):
            reason = (
                str(r.content[REFUSAL_RECORD][REFUSAL_REASON]) if REFUSAL_RECORD in r.content else "no reason given"
            )
            out.events.append({**event, "event": "refused", "reason": reason})
            out.refused.append({"site": site["site"], "reason": reason})
            continue
        out.events.append(event)
        offered.append((r, site))
    checks = check_updates([r.content[ARRAYS_RECORD] for r, _ in offered], global_arrays, norm_limit)
    for (r, site), check in zip(offered, checks, strict=True):
        if check.accepted:
            out.accepted.append(r)
            continue
        out.events.append(
            {
                "event": "rejected",
                "round": server_round,
                "site": site["site"],
                "role": site["role"],
                "reason": check.reason,
                "update_norm": None if math.isnan(check.norm) else check.norm,
            }
        )
        out.rejected.append({"site": site["site"], "reason": check.reason})
    return out
