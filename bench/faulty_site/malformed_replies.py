"""The replies a faulty or malicious site sends, each built from what an honest site would send.

`KINDS` maps every malformed training reply to the words the coordinator's rejection reason must hold
(``INFLATED_WEIGHT`` is accepted, its weight capped). Used in process by tests/test_reply_screening.py and,
over Flower's real transport, by the faulty site of tests/test_faults.py and bench/bench_faults.py
(bench/faulty_site/sitecustomize.py). Only numpy and Flower at import: a site process loads it before its
app bundle.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

ARRAYS, METRICS = "arrays", "metrics"
"""contract/wire.py's record names (not imported: this module loads before the site's app bundle)."""
INFLATED_WEIGHT = "inflated weight"


def _arrays(honest: RecordDict, change: Callable[[int, np.ndarray], np.ndarray]) -> RecordDict:
    arrays = ArrayRecord({k: Array(change(i, a.numpy())) for i, (k, a) in enumerate(honest[ARRAYS].items())})
    return RecordDict({ARRAYS: arrays, METRICS: honest[METRICS]})


def _first(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[RecordDict], RecordDict]:
    return lambda honest: _arrays(honest, lambda i, v: change(v) if i == 0 else v)


def _records(**records: object) -> Callable[[RecordDict], RecordDict]:
    def change(honest: RecordDict) -> RecordDict:
        kept = {**dict(honest.items()), **records}
        return RecordDict({k: v for k, v in kept.items() if v is not None})

    return change


def _metrics(**values: object) -> Callable[[RecordDict], RecordDict]:
    def change(honest: RecordDict) -> RecordDict:
        metrics = {k: v for k, v in {**dict(honest[METRICS]), **values}.items() if v is not None}
        return RecordDict({ARRAYS: honest[ARRAYS], METRICS: MetricRecord(metrics)})

    return change


def _extra_array(honest: RecordDict) -> RecordDict:
    arrays = ArrayRecord({**dict(honest[ARRAYS].items()), "evil": Array(np.ones(3, np.float32))})
    return RecordDict({ARRAYS: arrays, METRICS: honest[METRICS]})


def _first_nan(values: np.ndarray) -> np.ndarray:
    out = values.copy()
    out.flat[0] = np.nan
    return out


CHANGES: dict[str, Callable[[RecordDict], RecordDict]] = {
    "float64 values of 1e200": lambda h: _arrays(h, lambda i, v: np.full(v.shape, 1e200)),
    "scaled x1e6": lambda h: _arrays(h, lambda i, v: v * np.float32(1e6)),
    "another shape": _first(lambda v: np.zeros((v.size + 1,), v.dtype)),
    "a text array": _first(lambda v: np.full(v.shape, "x")),
    "a NaN": _first(_first_nan),
    "an array the model lacks": _extra_array,
    "no arrays record": _records(**{ARRAYS: None}),
    "no metrics record": _records(**{METRICS: None}),
    "metrics as a ConfigRecord": _records(**{METRICS: ConfigRecord({"num-examples": 3})}),
    "a metric the schema lacks": _metrics(**{"secret-sauce": 1.0}),
    "no num-examples": _metrics(**{"num-examples": None}),
    "a negative num-examples": _metrics(**{"num-examples": -5}),
    "a list as num-examples": _metrics(**{"num-examples": [1, 2]}),
    "more steps than asked": _metrics(steps=10**6),
    "an infinite metric": _metrics(seconds=math.inf),
    INFLATED_WEIGHT: _metrics(**{"num-examples": 10**9}),
}

KINDS: dict[str, str] = {
    "float64 values of 1e200": "float64",
    "scaled x1e6": "update-norm-cap",
    "another shape": "the run's schema says",
    "a text array": "the run's schema says",
    "a NaN": "NaN",
    "an array the model lacks": "not allowed ['evil']",
    "no arrays record": "has records",
    "no metrics record": "has records",
    "metrics as a ConfigRecord": "ConfigRecord",
    "a metric the schema lacks": "does not allow",
    "no num-examples": "lacks metric",
    "a negative num-examples": "outside",
    "a list as num-examples": "not a number",
    "more steps than asked": "steps",
    "an infinite metric": "infinite",
    INFLATED_WEIGHT: "",
}
"""Malformed training reply -> words of the coordinator's rejection reason ("" for an accepted reply)."""


def malformed_training_reply(kind: str, instruction: Message, honest: RecordDict) -> Message:
    """The reply of kind ``kind`` (one of `KINDS`) to the training message ``instruction``."""
    return Message(content=CHANGES[kind](honest), reply_to=instruction)


def honest_training_content(instruction: Message, num_examples: int = 3) -> RecordDict:
    """A training reply's content without training: the global arrays it was sent, barely moved."""
    rng = np.random.default_rng(instruction.metadata.dst_node_id)
    arrays = ArrayRecord(
        {
            k: Array(a.numpy() + rng.normal(0, 1e-3, a.numpy().shape).astype(a.numpy().dtype))
            for k, a in instruction.content[ARRAYS].items()
        }
    )
    return RecordDict(
        {ARRAYS: arrays, METRICS: MetricRecord({"num-examples": num_examples, "steps": 1, "seconds": 0.1})}
    )
