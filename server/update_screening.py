"""Screening of the sites' training replies before aggregation: what is aggregated, with what weight, and
what is left out and why.

`screen_training_replies` sorts every training reply into one of three outcomes, each an event for
metrics.jsonl: ``train`` (accepted), ``refused`` (the site declined the round, e.g. its privacy budget) and
``rejected`` (the coordinator will not use it). A reply is rejected when it does not fit the run's reply
schema (server/reply_checks.py: records, metrics and their ranges, exactly the arrays the site shares with
their shapes and dtypes, finite values, update norm under ``update-norm-cap``), or when its update norm is
more than ``update-norm-limit`` times the median of the other accepted updates' norms.

What reaches the strategy is rebuilt from the checked values: the arrays, the metrics every accepted reply
sent (a site may withhold any but ``num-examples``), and ``num-examples`` replaced by the weight
`aggregation_weights` allows, so one site cannot outweigh the others by claiming many subjects.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from contract.reply_schema import ReplySchema
from contract.wire import (
    ARRAYS_RECORD,
    DELTA_KEY,
    EPSILON_KEY,
    METRICS_RECORD,
    REFUSAL_REASON,
    REFUSAL_RECORD,
    REFUSED_KEY,
    WEIGHT_KEY,
)
from server.reply_checks import ReplyCheck, check_reply

WEIGHT_CAP_FACTOR = 2.0
"""``capped`` weights: a site weighs at most this many times the median of the other sites' reports."""


def check_float_arrays(arrays: ArrayRecord) -> None:
    """Raise ValueError naming any non-floating-point array: site-level DP noises every array it sends.

    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) cannot carry Gaussian noise; the networks
    here use InstanceNorm without running statistics, which has none.
    """
    integer = [k for k, a in arrays.items() if not np.issubdtype(np.dtype(a.numpy().dtype), np.floating)]
    if integer:
        raise ValueError(f"site-level DP needs floating-point arrays only; these are not: {integer}")


def norm_outliers(norms: Sequence[float], norm_limit: float) -> list[str | None]:
    """For each update norm, why it is an outlier: above ``norm_limit`` x the median norm of the *other*
    updates (so one huge update cannot raise its own yardstick). No rule with ``norm_limit`` 0, fewer than
    three updates, or a median of 0: with two, each is the other's yardstick, so a malicious site sending a
    tiny update would have the honest one rejected (the absolute cap, ``update-norm-cap``, still applies)."""
    reasons: list[str | None] = [None] * len(norms)
    if norm_limit <= 0 or len(norms) < 3:
        return reasons
    for i, norm in enumerate(norms):
        median = float(np.median([n for j, n in enumerate(norms) if j != i]))
        if median > 0 and norm > norm_limit * median:
            reasons[i] = (
                f"update norm {norm:.4g} is more than {norm_limit:g} x the median norm of the other sites' "
                f"updates ({median:.4g})"
            )
    return reasons


def aggregation_weights(reported: Sequence[float], declared: Sequence[int | None], mode: str) -> list[float]:
    """The weight of each accepted update in a weighted mean.

    ``uniform``: 1 each. ``capped``: the reported ``num-examples``, but at most `WEIGHT_CAP_FACTOR` x the
    median of the other sites' reports, and at most the training subjects the site declared when the run
    started (``declared``; None: unknown).
    """
    if mode == "uniform":
        return [1.0] * len(reported)
    weights = []
    for i, count in enumerate(reported):
        cap = math.inf
        others = [r for j, r in enumerate(reported) if j != i]
        if others:
            cap = WEIGHT_CAP_FACTOR * float(np.median(others))
        if declared[i]:
            cap = min(cap, float(declared[i]))
        weights.append(float(min(count, max(cap, 1.0))))
    return weights


@dataclass(frozen=True)
class TrainingSchemas:
    """The reply schemas of a training round: a trained update, and a declined round."""

    training: ReplySchema
    declined: ReplySchema
    weights: str = "capped"
    norm_limit: float = 10.0


@dataclass
class ScreenedRound:
    """The outcome of one round's screening.

    Attributes:
        accepted: the replies to aggregate, rebuilt from their checked content, in the order given.
        accepted_sites: the site of each accepted reply.
        events: metrics.jsonl events (``train``, ``refused`` or ``rejected``), in reply order.
        refused / rejected: ``{"site", "reason"}`` of each reply left out, for the audit log.
        epsilon: ``{site: {"epsilon", "delta"}}`` the sites reported this round (checked replies only).
    """

    accepted: list[Message] = field(default_factory=list)
    accepted_sites: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    epsilon: dict[str, Any] = field(default_factory=dict)


def is_declined(reply: Message) -> bool:
    """Whether a reply says the site declines (a ``refusal`` record, or metric ``refused`` = 1)."""
    content = reply.content
    if REFUSAL_RECORD in content.keys():
        return True
    metrics = content[METRICS_RECORD] if METRICS_RECORD in content.keys() else None
    return isinstance(metrics, MetricRecord) and metrics.get(REFUSED_KEY) == 1


def screen_training_replies(
    server_round: int,
    replies: Sequence[Message],
    global_arrays: ArrayRecord,
    schemas: TrainingSchemas,
    site_of: Callable[[Message], Mapping[str, Any]],
) -> ScreenedRound:
    """Sort a round's training replies into accepted, refused and rejected (see the module docstring).

    Args:
        site_of: ``{"site", "role", "num_train"}`` of a reply's sender (``num_train``: the training
            subjects it declared at site discovery, or None).
    """
    out = ScreenedRound()
    offered: list[tuple[Message, Mapping[str, Any], ReplyCheck]] = []
    for reply in replies:
        site = site_of(reply)
        declined = is_declined(reply)
        check = check_reply(reply, schemas.declined if declined else schemas.training, global_arrays)
        if EPSILON_KEY in check.metrics:
            out.epsilon[site["site"]] = {
                "epsilon": check.metrics[EPSILON_KEY],
                "delta": check.metrics.get(DELTA_KEY),
            }
        if not check.accepted:
            _reject(out, server_round, site, str(check.reason), check.update_norm)
        elif declined:
            reason = check.texts[REFUSAL_RECORD][REFUSAL_REASON]
            event = _site_event("refused", server_round, site, check.metrics)
            out.events.append({**event, "reason": reason})
            out.refused.append({"site": site["site"], "reason": reason})
        else:
            offered.append((reply, site, check))
    outliers = norm_outliers([float(c.update_norm or 0.0) for _, _, c in offered], schemas.norm_limit)
    kept = []
    for (reply, site, check), outlier in zip(offered, outliers, strict=True):
        if outlier is not None:
            _reject(out, server_round, site, outlier, check.update_norm)
        else:
            kept.append((reply, site, check))
    reported = [float(c.metrics[WEIGHT_KEY]) for _, _, c in kept]
    declared = [s.get("num_train") for _, s, _ in kept]
    weights = aggregation_weights(reported, declared, schemas.weights)
    shared = set.intersection(*(set(c.metrics) for _, _, c in kept)) if kept else set()
    for (reply, site, check), weight in zip(kept, weights, strict=True):
        metrics = {k: v for k, v in check.metrics.items() if k in shared}
        metrics[WEIGHT_KEY] = weight
        content = RecordDict({ARRAYS_RECORD: check.arrays, METRICS_RECORD: MetricRecord(metrics)})
        out.accepted.append(Message(content=content, metadata=copy.copy(reply.metadata)))
        out.accepted_sites.append(site["site"])
        event = _site_event("train", server_round, site, check.metrics)
        event.update({"weight": weight, "update_norm": check.update_norm})
        out.events.append(event)
    return out


def _site_event(kind: str, server_round: int, site: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict:
    event: dict[str, Any] = {
        "event": kind,
        "round": server_round,
        "site": site["site"],
        "role": site["role"],
        "split": "train",
        "metrics": dict(metrics),
    }
    if EPSILON_KEY in metrics:
        event["epsilon"] = metrics[EPSILON_KEY]
        event["delta"] = metrics.get(DELTA_KEY)
    return event


def _reject(
    out: ScreenedRound, server_round: int, site: Mapping[str, Any], reason: str, norm: float | None
) -> None:
    out.events.append(
        {
            "event": "rejected",
            "round": server_round,
            "stage": "training",
            "site": site["site"],
            "role": site["role"],
            "reason": reason,
            "update_norm": norm if norm is not None and math.isfinite(norm) else None,
        }
    )
    out.rejected.append({"site": site["site"], "reason": reason})
