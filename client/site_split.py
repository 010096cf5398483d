"""A site's train/test split of its subjects, by person, fixed by a key.

Every site holds out a test split that the federation never trains on. The unit of the split is the
person (`client.subjects.person_of`): all sessions of ``sub-01`` are on one side, so a person's scans
never sit in both splits. The order comes from a keyed hash of each person id, never from the order the
files were discovered in, so a resumed run, a re-run and the report all see the same split.

A site splits with a key derived from its own secret (client/site_secret.py), which the coordinator
never sees: the split is fixed for the site's lifetime, and no choice of run settings moves a chosen
person into or out of the test set (differencing the answers of two runs recovers nobody). A local
baseline (`neurofed train`) splits with its seed instead.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable
from dataclasses import dataclass

from client.subjects import person_of


@dataclass(frozen=True)
class SiteSplit:
    """Subject ids of one site, split into training and test (each sorted, disjoint, whole persons)."""

    train: tuple[str, ...]
    test: tuple[str, ...]

    @property
    def test_persons(self) -> int:
        return len({person_of(s) for s in self.test})


def seed_key(seed: int) -> bytes:
    """The split key of a split made from a public seed (a local baseline, not a federated site)."""
    return f"neurofed-split-seed|{seed}".encode()


def _rank(person: str, key: bytes) -> bytes:
    # A keyed hash orders persons independently of discovery order and of the other persons.
    return hmac.new(key, person.encode(), hashlib.sha256).digest()


def split_subjects(subject_ids: Iterable[str], test_fraction: float, key: bytes) -> SiteSplit:
    """Split a site's subjects into train and test, whole persons at a time.

    Args:
        subject_ids: the site's usable subject ids (order does not matter; duplicates are an error).
        test_fraction: share of persons held out for testing, in [0, 1]. At least one person is held
            out when the fraction is > 0, and at least one trains when there are two or more.
            1.0 holds out every subject (a site that never trains, e.g. the unseen site).
        key: the split key (the site's secret-derived key, or `seed_key`); the same ids, fraction and
            key always give the same split.

    Raises:
        ValueError: for a fraction outside [0, 1] or duplicate ids.
    """
    ids = list(subject_ids)
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test fraction must be within [0, 1], got {test_fraction}")
    if len(set(ids)) != len(ids):
        raise ValueError("subject ids must be unique")
    if test_fraction == 1.0:
        return SiteSplit(train=(), test=tuple(sorted(ids)))
    persons = sorted({person_of(s) for s in ids}, key=lambda p: _rank(p, key))
    n_test = math.ceil(test_fraction * len(persons)) if test_fraction > 0 else 0
    if len(persons) >= 2:
        n_test = min(n_test, len(persons) - 1)
    held_out = set(persons[:n_test])
    return SiteSplit(
        train=tuple(sorted(s for s in ids if person_of(s) not in held_out)),
        test=tuple(sorted(s for s in ids if person_of(s) in held_out)),
    )
