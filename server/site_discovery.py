"""The sites of a run, as their answers to the ``query`` message describe them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import Message

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
