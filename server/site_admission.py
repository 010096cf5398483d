"""Which nodes take part in a deployed run: enrolled ones, under the name they were enrolled with.

Flower's SuperLink lets in any SuperNode whose key it knows, including one registered through its Control
API without `neurofed coordinator enroll`. A deployed run (server/app.py) therefore asks the enrolment
registry (``sites.json``, server/site_registry.py) again: a node takes part only if it is enrolled and
the site id it declares equals its enrolled name, and it stops taking part from the next message on once
it is revoked, without a restart. In simulation there is no registry and every node takes part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

Enrolment = Callable[[], Mapping[int, str]]
"""Reads the registry: node id -> enrolled name (called again before every round)."""


@dataclass(frozen=True)
class Admission:
    """What the registry says of some nodes: those admitted, and why each other one is not."""

    admitted: list[int]
    refused: dict[int, str]


def enrolled_nodes(node_ids: Iterable[int], enrolment: Enrolment | None) -> Admission:
    """Split ``node_ids`` into enrolled nodes and the others (all admitted without a registry)."""
    node_ids = list(node_ids)
    if enrolment is None:
        return Admission(node_ids, {})
    names = enrolment()
    refused = {
        n: f"node {n} is connected but not enrolled (not in sites.json); enroll it with `neurofed coordinator "
        "enroll` to let it take part"
        for n in node_ids
        if n not in names
    }
    return Admission([n for n in node_ids if n in names], refused)


def identity_problem(node_id: int, declared: str, enrolment: Mapping[int, str] | None) -> str | None:
    """Why a node declaring site id ``declared`` may not take part under it (None: it may)."""
    if enrolment is None:
        return None
    enrolled = enrolment.get(node_id)
    if enrolled is None:
        return f"node {node_id} is not enrolled"
    if declared != enrolled:
        return (
            f"node {node_id} declares site id {declared[:80]!r} but was enrolled as {enrolled!r}; the site sets "
            "its --site-id to its enrolled name"
        )
    return None
