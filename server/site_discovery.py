"""The sites of a run, as their answers to the ``query`` message describe them.

Every answer is checked against the site-description schema (contract/reply_schema.py) and, in a
deployment, against the enrolment registry (server/site_admission.py); a site whose answer does not fit,
or whose preprocessing plan differs from the one most sites declare, is left out of the run with the
reason (a ``rejected`` event) while the others go on.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from contract.reply_schema import site_description_schema
from contract.version import CONTRACT_VERSION, CONTRACT_VERSION_KEY, contract_mismatch
from contract.wire import (
    NUM_TEST_KEY,
    NUM_TRAIN_KEY,
    PLAN_KEY,
    ROLE_KEY,
    ROLE_TRAIN,
    SITE_ID_KEY,
    SITE_RECORD,
)
from models.errors import NeurofedError
from server.reply_checks import check_reply
from server.site_admission import identity_problem


@dataclass(frozen=True)
class Site:
    """A site as the server knows it: its node, its self-declared id and role, its subject counts."""

    node_id: int
    site_id: str
    role: str
    num_train: int
    num_test: int


def compatible_replies(
    replies: Sequence[Message], name_of: Callable[[int], str]
) -> tuple[list[Message], list[dict[str, Any]]]:
    """The ``query`` replies of sites whose installed neurofed speaks this app's contract version, and
    ``{"site", "role", "reason"}`` of each other site (the reason names both versions). A reply without a
    site record is kept: the reply schema rejects it (`sites_from_replies`)."""
    compatible, left_out = [], []
    for r in replies:
        if SITE_RECORD not in r.content:
            compatible.append(r)
            continue
        info = r.content[SITE_RECORD]
        site = str(info[SITE_ID_KEY])[:200] if SITE_ID_KEY in info else name_of(r.metadata.src_node_id)
        reported = info.get(CONTRACT_VERSION_KEY)
        version = reported if isinstance(reported, int) and not isinstance(reported, bool) else None
        mismatch = contract_mismatch(CONTRACT_VERSION, version or None, f"site {site}")
        if mismatch is None:
            compatible.append(r)
        else:
            left_out.append(
                {"site": site, "role": str(info.get(ROLE_KEY, ""))[:20] or None, "reason": mismatch}
            )
    return compatible, left_out


@dataclass
class Discovery:
    """The sites that take part (sorted by id), their common plan, and the nodes left out.

    Attributes:
        rejected: ``{"node_id", "site", "reason"}`` of each answer left out.
    """

    sites: list[Site]
    plan: dict[str, Any]
    rejected: list[dict[str, Any]] = field(default_factory=list)


def sites_from_replies(
    replies: Sequence[Message], min_sites: int, enrolment: Mapping[int, str] | None = None
) -> Discovery:
    """The sites and their common preprocessing plan, from the ``query`` replies.

    Args:
        enrolment: node id -> enrolled name (a deployment); None in simulation.

    Raises:
        NeurofedError: two sites declare one id, no site trains, no plan is shared by more sites than any
            other, or fewer than ``min_sites`` (> 0) training sites take part.
    """
    schema = site_description_schema()
    candidates: list[tuple[Site, str]] = []
    rejected: list[dict[str, Any]] = []
    for r in replies:
        node_id = r.metadata.src_node_id
        check = check_reply(r, schema)
        info = check.texts.get(SITE_RECORD, {})
        reason = check.reason or identity_problem(node_id, info[SITE_ID_KEY], enrolment)
        if reason is None and not _is_plan(info[PLAN_KEY]):
            reason = "its preprocessing plan is not a JSON object"
        if reason is not None:
            name = (enrolment or {}).get(node_id) or (info.get(SITE_ID_KEY) if check.accepted else None)
            rejected.append({"node_id": node_id, "site": name or f"node {node_id}", "reason": reason})
            continue
        site = Site(
            node_id=node_id,
            site_id=info[SITE_ID_KEY],
            role=info[ROLE_KEY],
            num_train=int(check.metrics[NUM_TRAIN_KEY]),
            num_test=int(check.metrics[NUM_TEST_KEY]),
        )
        candidates.append((site, info[PLAN_KEY]))
    plan = _common_plan([p for _, p in candidates])
    sites = []
    for site, site_plan in candidates:
        if site_plan == plan:
            sites.append(site)
        else:
            reason = f"it prepares its data with plan {site_plan[:300]}, the other sites with {plan[:300]}"
            rejected.append({"node_id": site.node_id, "site": site.site_id, "reason": reason})
    sites.sort(key=lambda s: s.site_id)
    _check_sites(sites, min_sites)
    return Discovery(sites, json.loads(plan), rejected)


def _is_plan(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _common_plan(plans: Sequence[str]) -> str:
    counts = Counter(plans).most_common()
    if not counts:
        raise NeurofedError("no site described itself usably; see the rejected sites in metrics.jsonl")
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        raise NeurofedError(
            f"sites prepare their data with different preprocessing plans ({sorted(set(plans))}); every site "
            "must run the same neurofed version with the run's settings"
        )
    return counts[0][0]


def _check_sites(sites: Sequence[Site], min_sites: int) -> None:
    ids = [s.site_id for s in sites]
    if len(set(ids)) != len(ids):
        raise NeurofedError(f"two sites declare the same site id: {ids}; give each site its own site-id")
    if not any(s.role == ROLE_TRAIN for s in sites):
        raise NeurofedError(f"no site has role {ROLE_TRAIN!r} (sites: {ids}); at least one site must train")
    trainers = sum(s.role == ROLE_TRAIN for s in sites)
    if min_sites > trainers:
        raise NeurofedError(
            f"run setting 'min-sites' is {min_sites} but only {trainers} training site(s) "
            f"joined ({ids}); lower min-sites or start more sites"
        )


def site_summaries(sites: Sequence[Site]) -> list[dict[str, Any]]:
    """The sites as config.json and metrics.jsonl record them."""
    return [
        {"site": s.site_id, "role": s.role, "num_train": s.num_train, "num_test": s.num_test} for s in sites
    ]
