"""The sites of a run, as their answers to the ``query`` message describe them."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import Message

from contract.version import CONTRACT_VERSION, CONTRACT_VERSION_KEY, contract_mismatch
from contract.wire import (
    METRICS_RECORD,
    NUM_TEST_KEY,
    NUM_TRAIN_KEY,
    PLAN_KEY,
    ROLE_KEY,
    ROLE_TRAIN,
    SITE_ID_KEY,
    SITE_RECORD,
)
from models.errors import NeurofedError


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
    ``{"site", "role", "reason"}`` of each other site (the reason names both versions)."""
    compatible, left_out = [], []
    for r in replies:
        info = r.content[SITE_RECORD]
        site = str(info[SITE_ID_KEY]) if SITE_ID_KEY in info else name_of(r.metadata.src_node_id)
        version = int(info[CONTRACT_VERSION_KEY]) if CONTRACT_VERSION_KEY in info else None
        mismatch = contract_mismatch(CONTRACT_VERSION, version or None, f"site {site}")
        if mismatch is None:
            compatible.append(r)
        else:
            left_out.append({"site": site, "role": str(info.get(ROLE_KEY, "")) or None, "reason": mismatch})
    return compatible, left_out


def sites_from_replies(replies: Sequence[Message], min_sites: int) -> tuple[list[Site], dict[str, Any]]:
    """The sites (sorted by id) and their common preprocessing plan, from the ``query`` replies.

    Raises:
        NeurofedError: two sites declare one id, no site trains, the sites' plans differ, or fewer than
            ``min_sites`` (> 0) training sites joined.
    """
    sites = []
    for r in replies:
        info, counts = r.content[SITE_RECORD], r.content[METRICS_RECORD]
        sites.append(
            Site(
                node_id=r.metadata.src_node_id,
                site_id=str(info[SITE_ID_KEY]),
                role=str(info[ROLE_KEY]),
                num_train=int(counts[NUM_TRAIN_KEY]),
                num_test=int(counts[NUM_TEST_KEY]),
            )
        )
    sites.sort(key=lambda s: s.site_id)
    ids = [s.site_id for s in sites]
    if len(set(ids)) != len(ids):
        raise NeurofedError(f"two sites declare the same site id: {ids}; give each site its own site-id")
    if not any(s.role == ROLE_TRAIN for s in sites):
        raise NeurofedError(f"no site has role {ROLE_TRAIN!r} (sites: {ids}); at least one site must train")
    plans = {str(r.content[SITE_RECORD][PLAN_KEY]) for r in replies}
    if len(plans) != 1:
        raise NeurofedError(
            f"sites prepare their data with different preprocessing plans ({sorted(plans)}); every site "
            "must run the same neurofed version with the run's settings"
        )
    trainers = sum(s.role == ROLE_TRAIN for s in sites)
    if min_sites > trainers:
        raise NeurofedError(
            f"run setting 'min-sites' is {min_sites} but only {trainers} training site(s) "
            f"joined ({ids}); lower min-sites or start more sites"
        )
    return sites, json.loads(plans.pop())


def site_summaries(sites: Sequence[Site]) -> list[dict[str, Any]]:
    """The sites as config.json and metrics.jsonl record them."""
    return [{"site": s.site_id, "role": s.role, "num_train": s.num_train, "num_test": s.num_test} for s in sites]
