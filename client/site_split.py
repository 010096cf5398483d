"""A site's deterministic train/test split of its subjects.

Every site holds out a test split that the federation never trains on. The split depends only on the
subject ids, the test fraction and the run seed, never on the order the files were discovered in, so
a resumed run, a re-run and the report all see the same split.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class SiteSplit:
    """Subject ids of one site, split into training and test (each sorted, disjoint)."""

    train: tuple[str, ...]
    test: tuple[str, ...]


def _rank(subject_id: str, seed: int) -> str:
    # A keyed hash orders subjects independently of discovery order and of the other subjects.
    return hashlib.sha256(f"{seed}:{subject_id}".encode()).hexdigest()


def split_subjects(subject_ids: Iterable[str], test_fraction: float, seed: int) -> SiteSplit:
    """Split a site's subjects into train and test.

    Args:
        subject_ids: the site's usable subject ids (order does not matter; duplicates are an error).
        test_fraction: share of subjects held out for testing, in [0, 1]. At least one subject is
            held out when the fraction is > 0, and at least one trains when there are two or more.
            1.0 holds out every subject (a site that never trains, e.g. the unseen site).
        seed: run seed; the same ids, fraction and seed always give the same split.

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
    n_test = math.ceil(test_fraction * len(ids)) if test_fraction > 0 else 0
    if len(ids) >= 2:
        n_test = min(n_test, len(ids) - 1)
    ranked = sorted(ids, key=lambda s: _rank(s, seed))
    return SiteSplit(train=tuple(sorted(ranked[n_test:])), test=tuple(sorted(ranked[:n_test])))
