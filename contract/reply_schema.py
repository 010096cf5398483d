"""What a site may send back: the schema of every reply, derived from the run's settings.

The coordinator checks each reply against the schema of its kind before it uses any of it
(server/reply_checks.py); a reply that does not fit is left out with a ``rejected`` event (site, round,
reason), never an exception that ends the run. The kinds:

- **training**: exactly the records ``arrays`` and ``metrics``. ``arrays`` holds exactly the arrays the
  site shares (every array of the global model but those it keeps at home, e.g. FedBN's normalization
  layers), each with the global model's shape and dtype, every value finite, and the update (site arrays
  minus global arrays) of L2 norm at most ``update-norm-cap``. ``metrics`` holds ``num-examples`` and any
  of the run's other training metrics, each within its range.
- **declined** (a training round or an evaluation the site will not do): ``metrics`` (``refused`` = 1,
  ``num-examples`` = 0, with DP the run's ε so far) and ``refusal`` (its ``reason``).
- **evaluation**: ``metrics``: ``num-examples`` and any of the per-class metrics of the run's protocol
  (`evaluation_metric_key`; a FedBN run also the personalised model's, with `PERSONAL_PREFIX`).
- **site description** (the reply to the ``query`` message): ``site`` (id, role, preprocessing plan) and
  ``metrics`` (subject counts).

A site may withhold any metric but the required ones: a metric it does not send is simply not used.
A metric the schema does not name, a value of the wrong kind or outside its range, is a rejection.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from contract.run_config import RunConfig
from contract.version import CONTRACT_VERSION_KEY
from contract.wire import (
    ARRAYS_RECORD,
    DELTA_KEY,
    EPSILON_KEY,
    METRICS_RECORD,
    NOISE_MULTIPLIER_KEY,
    NUM_TEST_KEY,
    NUM_TRAIN_KEY,
    PERSONAL_PREFIX,
    PLAN_KEY,
    REFUSAL_REASON,
    REFUSAL_RECORD,
    REFUSED_KEY,
    ROLE_KEY,
    ROLES,
    SAMPLE_RATE_KEY,
    SECONDS_KEY,
    SITE_ID_KEY,
    SITE_RECORD,
    STEPS_KEY,
    TRAIN_LOSS_KEY,
    WEIGHT_KEY,
)

ARRAY_RECORD_TYPE = "arrays"
METRIC_RECORD_TYPE = "metrics"
CONFIG_RECORD_TYPE = "config"
"""The three kinds of record a reply's RecordDict holds (Flower's ArrayRecord, MetricRecord, ConfigRecord)."""

EVALUATION_METRICS: tuple[str, ...] = ("dice", "hd95", "assd")
"""Per-class evaluation metrics a site reports: Dice (0..1), HD95 and ASSD (mm)."""
MEAN_DICE_KEY = "dice-mean"
"""Mean over the foreground classes of the per-class Dice."""
MAX_TEXT_LENGTH = 100_000
"""Longest text a reply's ConfigRecord value may be (a preprocessing plan is ~1 kB)."""


def evaluation_metric_key(metric: str, class_name: str, prefix: str = "") -> str:
    """The metric name of ``metric`` (one of `EVALUATION_METRICS`) for one class, e.g. ``dice-gm``."""
    return f"{prefix}{metric}-{class_name}"


@dataclass(frozen=True)
class ArraySpec:
    """One array a site may send: its exact shape and numpy dtype name (``"float32"``)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class MetricSpec:
    """The values one metric may take: a number in ``[low, high]``, whole if ``integer``; NaN only where
    ``nan_allowed`` (an undefined value, e.g. HD95 of a class no test subject has); never infinite."""

    low: float = 0.0
    high: float = math.inf
    integer: bool = False
    nan_allowed: bool = False

    def problem(self, value: object) -> str | None:
        """Why ``value`` does not fit, or None."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"is a {type(value).__name__}, not a number"
        if math.isnan(value):
            return None if self.nan_allowed else "is NaN"
        if math.isinf(value):
            return "is infinite"
        if self.integer and not float(value).is_integer():
            return f"is {value!r}, not a whole number"
        if not self.low <= value <= self.high:
            return f"is {value!r}, outside [{self.low:g}, {self.high:g}]"
        return None


@dataclass(frozen=True)
class TextSpec:
    """A text field of a ConfigRecord: any string up to ``max_length`` characters, or one of ``choices``."""

    choices: tuple[str, ...] = ()
    max_length: int = MAX_TEXT_LENGTH

    def problem(self, value: object) -> str | None:
        if not isinstance(value, str):
            return f"is a {type(value).__name__}, not text"
        if len(value) > self.max_length:
            return f"is {len(value)} characters long, more than {self.max_length}"
        if self.choices and value not in self.choices:
            return f"is {value[:40]!r}, not one of {', '.join(self.choices)}"
        return None


@dataclass(frozen=True)
class WholeNumberSpec:
    """A whole-number field of a ConfigRecord, such as the contract version a site reports."""

    def problem(self, value: object) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"is {str(value)[:40]!r}, not a whole number"
        return None


@dataclass(frozen=True)
class ReplySchema:
    """Everything one kind of reply may hold.

    Attributes:
        kind: what the reply is (``training``, ``declined``, ``evaluation``, ``site description``).
        records: record name -> record type (`ARRAY_RECORD_TYPE`, ...), exactly the records it holds.
        metrics: every metric it may send, with its range.
        required_metrics: the metrics it must send.
        texts: record name -> field -> spec, for its ConfigRecords (every field required).
        arrays: exactly the arrays it must send (training replies), with shapes and dtypes.
        max_update_norm: the largest L2 norm of (site arrays - global arrays) accepted.
        frozen: arrays the run does not train (``trainable-layers``): whatever a site sends for them, the
            coordinator keeps the global model's values, so no site can move a layer honest sites never train.
    """

    kind: str
    records: Mapping[str, str]
    metrics: Mapping[str, MetricSpec]
    required_metrics: frozenset[str] = frozenset({WEIGHT_KEY})
    texts: Mapping[str, Mapping[str, TextSpec | WholeNumberSpec]] = field(default_factory=dict)
    arrays: Mapping[str, ArraySpec] = field(default_factory=dict)
    max_update_norm: float = math.inf
    frozen: frozenset[str] = frozenset()

    def metrics_problem(self, metrics: Mapping[str, object]) -> str | None:
        """Why the reply's metrics do not fit (the first problem found), or None."""
        missing = sorted(self.required_metrics - set(metrics))
        if missing:
            return f"{self.kind} reply lacks metric(s) {missing}"
        unknown = sorted(set(metrics) - set(self.metrics))
        if unknown:
            return f"{self.kind} reply has metric(s) the run's schema does not allow: {unknown[:5]}"
        for name, value in metrics.items():
            if (problem := self.metrics[name].problem(value)) is not None:
                return f"metric {name!r} {problem}"
        return None

    def texts_problem(self, record: str, values: Mapping[str, object]) -> str | None:
        """Why ConfigRecord ``record``'s fields do not fit, or None."""
        specs = self.texts.get(record, {})
        if set(values) != set(specs):
            return f"record {record!r} has fields {sorted(values)[:5]}, expected {sorted(specs)}"
        for name, value in values.items():
            if (problem := specs[name].problem(value)) is not None:
                return f"{record}.{name} {problem}"
        return None


_COUNT = MetricSpec(integer=True)
_NUMBER = MetricSpec()
_PROBABILITY = MetricSpec(high=1.0)


def _privacy_metrics(run: RunConfig) -> dict[str, MetricSpec]:
    return {EPSILON_KEY: _NUMBER, DELTA_KEY: _PROBABILITY} if run.dp else {}


def training_reply_schema(
    run: RunConfig,
    model_arrays: Mapping[str, ArraySpec],
    kept_at_site: Collection[str] = (),
    frozen: Collection[str] = (),
) -> ReplySchema:
    """The reply to a training message of this run.

    Args:
        model_arrays: every array of the global model, by name.
        kept_at_site: arrays the site keeps and must not send (FedBN: the normalization layers).
        frozen: arrays the run does not train (sent back, but the global values are kept).
    """
    metrics = {
        WEIGHT_KEY: MetricSpec(low=1, integer=True),
        STEPS_KEY: MetricSpec(high=run.local_steps, integer=True),
        SECONDS_KEY: _NUMBER,
        REFUSED_KEY: MetricSpec(high=0, integer=True),
        **_privacy_metrics(run),
    }
    if run.dp:
        metrics.update({NOISE_MULTIPLIER_KEY: _NUMBER, SAMPLE_RATE_KEY: _PROBABILITY})
    else:
        # An unnoised loss is a function of every training subject: only a round without DP releases it.
        metrics[TRAIN_LOSS_KEY] = _NUMBER
    kept = set(kept_at_site)
    return ReplySchema(
        kind="training",
        records={ARRAYS_RECORD: ARRAY_RECORD_TYPE, METRICS_RECORD: METRIC_RECORD_TYPE},
        metrics=metrics,
        arrays={k: v for k, v in model_arrays.items() if k not in kept},
        max_update_norm=run.update_norm_cap,
        frozen=frozenset(frozen) & (set(model_arrays) - kept),
    )


def declined_reply_schema(run: RunConfig) -> ReplySchema:
    """The reply of a site that declines a training round or an evaluation (client/app.py's refusals)."""
    return ReplySchema(
        kind="declined",
        records={METRICS_RECORD: METRIC_RECORD_TYPE, REFUSAL_RECORD: CONFIG_RECORD_TYPE},
        metrics={
            REFUSED_KEY: MetricSpec(low=1, high=1, integer=True),
            WEIGHT_KEY: MetricSpec(high=0, integer=True),
            # A declined training round says how much of its budget the run already spent.
            EPSILON_KEY: _NUMBER,
            DELTA_KEY: _PROBABILITY,
        },
        required_metrics=frozenset({REFUSED_KEY}),
        texts={REFUSAL_RECORD: {REFUSAL_REASON: TextSpec(max_length=4000)}},
    )


def evaluation_reply_schema(run: RunConfig, *, personal: bool = False) -> ReplySchema:
    """The reply to an evaluation message: per-class metrics of the run's protocol (``personal``: also
    those of the site's personalised model, FedBN)."""
    from models.label_protocols import get_protocol

    distance = MetricSpec(nan_allowed=True)
    score = MetricSpec(high=1.0, nan_allowed=True)
    metrics: dict[str, MetricSpec] = {WEIGHT_KEY: _COUNT}
    for prefix in ("", PERSONAL_PREFIX) if personal else ("",):
        for name in get_protocol(run.protocol).class_names[1:]:
            for metric in EVALUATION_METRICS:
                key = evaluation_metric_key(metric, name, prefix)
                metrics[key] = score if metric == "dice" else distance
        metrics[prefix + MEAN_DICE_KEY] = score
    return ReplySchema(kind="evaluation", records={METRICS_RECORD: METRIC_RECORD_TYPE}, metrics=metrics)


def site_description_schema() -> ReplySchema:
    """The reply to the ``query`` message: the site's id, role and plan, and its subject counts."""
    return ReplySchema(
        kind="site description",
        records={SITE_RECORD: CONFIG_RECORD_TYPE, METRICS_RECORD: METRIC_RECORD_TYPE},
        metrics={NUM_TRAIN_KEY: _COUNT, NUM_TEST_KEY: _COUNT},
        required_metrics=frozenset({NUM_TRAIN_KEY, NUM_TEST_KEY}),
        texts={
            SITE_RECORD: {
                SITE_ID_KEY: TextSpec(max_length=200),
                ROLE_KEY: TextSpec(ROLES),
                CONTRACT_VERSION_KEY: WholeNumberSpec(),
                PLAN_KEY: TextSpec(),
            }
        },
    )
