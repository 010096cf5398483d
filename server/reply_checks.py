"""One site reply checked against its schema (contract/reply_schema.py) before anything uses it.

`check_reply` never raises on what a site sent: missing, extra or mistyped records, metrics that are not
numbers or lie outside their range, arrays of another name, shape or dtype, text arrays, NaN or Inf, and
updates so large that their squared norm would overflow all become a `ReplyCheck` with the reason. What
passes comes back as fresh records built from the checked values, so nothing later reads the reply itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from contract.reply_schema import (
    ARRAY_RECORD_TYPE,
    CONFIG_RECORD_TYPE,
    METRIC_RECORD_TYPE,
    ArraySpec,
    ReplySchema,
)
from contract.wire import ARRAYS_RECORD

_RECORD_TYPES = {
    ARRAY_RECORD_TYPE: ArrayRecord,
    METRIC_RECORD_TYPE: MetricRecord,
    CONFIG_RECORD_TYPE: ConfigRecord,
}


@dataclass(frozen=True)
class ReplyCheck:
    """The verdict on one reply.

    Attributes:
        reason: why the reply is rejected; None when it fits its schema.
        metrics: its metrics (checked: numbers within range), empty when rejected before them.
        texts: its ConfigRecords' fields (checked), by record.
        arrays: its arrays rebuilt from the checked values (training replies), else None.
        update_norm: L2 norm of (site arrays - global arrays) in float64, when it was computed.
    """

    reason: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    texts: dict[str, dict[str, str]] = field(default_factory=dict)
    arrays: ArrayRecord | None = None
    update_norm: float | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None


def array_specs(arrays: ArrayRecord) -> dict[str, ArraySpec]:
    """The name, shape and dtype of every array of ``arrays`` (the global model)."""
    specs = {}
    for key, array in arrays.items():
        values = array.numpy()
        specs[key] = ArraySpec(tuple(int(n) for n in values.shape), values.dtype.name)
    return specs


def check_reply(reply: Message, schema: ReplySchema, global_arrays: ArrayRecord | None = None) -> ReplyCheck:
    """Check ``reply``'s records, metrics, texts and (``schema.arrays``) arrays against ``schema``.

    Args:
        global_arrays: the model the site was sent; needed when the schema has arrays (the update is the
            difference from it).
    """
    try:
        return _check(reply, schema, global_arrays)
    except Exception as exc:  # a reply is data from outside: no content of it may end the run
        return ReplyCheck(f"{schema.kind} reply could not be read: {type(exc).__name__}: {exc}"[:600])


def _check(reply: Message, schema: ReplySchema, global_arrays: ArrayRecord | None) -> ReplyCheck:
    content = reply.content
    names = set(content.keys())
    if names != set(schema.records):
        return ReplyCheck(
            f"{schema.kind} reply has records {sorted(names)}, expected {sorted(schema.records)}"
        )
    for name, kind in schema.records.items():
        if not isinstance(content[name], _RECORD_TYPES[kind]):
            return ReplyCheck(f"record {name!r} is a {type(content[name]).__name__}, expected {kind}")
    metrics = {
        k: v
        for name, kind in schema.records.items()
        if kind == METRIC_RECORD_TYPE
        for k, v in content[name].items()
    }
    if (problem := schema.metrics_problem(metrics)) is not None:
        return ReplyCheck(problem)
    texts = {}
    for name, kind in schema.records.items():
        if kind == CONFIG_RECORD_TYPE:
            values = dict(content[name])
            if (problem := schema.texts_problem(name, values)) is not None:
                return ReplyCheck(problem, metrics)
            texts[name] = values
    if not schema.arrays:
        return ReplyCheck(None, metrics, texts)
    assert global_arrays is not None, "a schema with arrays needs the global arrays"
    return _check_arrays(content[ARRAYS_RECORD], schema, global_arrays, metrics, texts)


def _check_arrays(
    arrays: ArrayRecord,
    schema: ReplySchema,
    global_arrays: ArrayRecord,
    metrics: dict[str, Any],
    texts: dict[str, dict[str, str]],
) -> ReplyCheck:
    def rejected(reason: str, norm: float | None = None) -> ReplyCheck:
        return ReplyCheck(reason, metrics, texts, None, norm)

    sent, expected = set(arrays.keys()), set(schema.arrays)
    if sent != expected:
        extra, missing = sorted(sent - expected), sorted(expected - sent)
        return rejected(
            f"arrays differ from the run's schema: not allowed {extra[:5]}, missing {missing[:5]}"
        )
    checked: dict[str, np.ndarray] = {}
    for key, spec in schema.arrays.items():
        values = np.asarray(arrays[key].numpy())
        if values.dtype != np.dtype(spec.dtype) or tuple(values.shape) != spec.shape:
            return rejected(
                f"array {key!r} is {values.dtype.name} {tuple(values.shape)}, the run's schema says "
                f"{spec.dtype} {spec.shape}"
            )
        if not np.all(np.isfinite(values)):
            return rejected(f"array {key!r} holds NaN or Inf values")
        checked[key] = values
    for key in schema.frozen:  # layers the run does not train keep their global values, whatever was sent
        checked[key] = np.asarray(global_arrays[key].numpy())
    norm = update_norm(checked, {k: global_arrays[k].numpy() for k in checked})
    if not math.isfinite(norm) or norm > schema.max_update_norm:
        return rejected(
            f"update norm {norm:.4g} is above the cap of {schema.max_update_norm:g} (update-norm-cap)", norm
        )
    record = ArrayRecord({k: Array(np.array(v, copy=True)) for k, v in checked.items()})
    return ReplyCheck(None, metrics, texts, record, norm)


def update_norm(site: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``site - global`` over all arrays, in float64, without overflow: each array's norm is
    taken after dividing by its largest entry (1e200 squared is inf in float64, its norm is not), and the
    arrays' norms are combined with `math.hypot`. Inf only when a difference itself is not finite."""
    norms = []
    for key, values in site.items():
        with np.errstate(over="ignore", invalid="ignore"):
            diff = np.asarray(values, dtype=np.float64) - np.asarray(global_arrays[key], dtype=np.float64)
        if diff.size == 0:
            continue
        largest = float(np.max(np.abs(diff)))
        if not math.isfinite(largest):
            return math.inf
        norms.append(0.0 if largest == 0 else largest * float(np.linalg.norm(diff.ravel() / largest)))
    return math.hypot(*norms)
