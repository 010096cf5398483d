"""Settings dataclasses to and from plain dicts (JSON, model files): one rule for unknown keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def from_known_dict(cls: type[T], d: Mapping[str, Any], what: str, error: type[Exception]) -> T:
    """``cls(**d)``, refusing keys that are not fields of the dataclass ``cls``.

    Raises:
        error: ``"<what> has unknown keys [...]; known: [...]"`` (a file of a newer or another version).
    """
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - known)
    if unknown:
        raise error(f"{what} has unknown keys {unknown}; known: {sorted(known)}")
    return cls(**dict(d))
