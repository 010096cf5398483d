"""One evaluation step of a federated run: every site scores the global model on its test split.

Each reply is checked against the run's reply schema (contract/reply_schema.py) first: a declined
evaluation is an ``evaluate-refused`` event with the site's reason, a reply that does not fit a
``rejected`` event (stage ``evaluation``), and only checked values reach metrics.jsonl and the strategy's
aggregate, with each training site's weight capped as for training (server/update_screening.py).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from contract.reply_schema import declined_reply_schema, evaluation_reply_schema
from contract.run_config import RunConfig
from contract.wire import (
    METRICS_RECORD,
    PERSONAL_PREFIX,
    REFUSAL_REASON,
    REFUSAL_RECORD,
    ROLE_TRAIN,
    WEIGHT_KEY,
)
from server.reply_checks import check_reply
from server.site_discovery import Site
from server.site_replies import NodeView
from server.update_screening import aggregation_weights, is_declined


class RunSteps(Protocol):
    """What an evaluation step uses of the run (server/federated_run.py's `FederatedRun`)."""

    config: RunConfig

    def round_config(self, server_round: int) -> Any: ...

    def _send(
        self, messages: Any, what: str, server_round: int, required: int | None = None
    ) -> tuple[list[Message], list[dict[str, Any]]]: ...

    def _emit(self, event: dict[str, Any], *, log_it: bool = True) -> None: ...

    def audit_event(self, event: str, **fields: Any) -> None: ...

    def _left_out(
        self, server_round: int, stage: str, site: str, role: str | None, reason: str, **audit: Any
    ) -> None: ...


def evaluate_round(
    run: RunSteps, strategy: Strategy, server_round: int, arrays: ArrayRecord, sites: Sequence[Site]
) -> None:
    """Send the global ``arrays`` to ``sites`` for evaluation; log what each answered and the aggregate."""
    by_node = {s.node_id: s for s in sites}
    messages = strategy.configure_evaluate(
        server_round, arrays, run.round_config(server_round), NodeView(by_node)
    )
    replies, dropped = run._send(messages, "evaluation", server_round, required=1)
    declined = declined_reply_schema(run.config)
    answered = evaluation_reply_schema(run.config, personal=run.config.strategy == "fedbn")
    scored: list[tuple[Message, Site, dict[str, Any]]] = []
    refusals: list[dict[str, str]] = []
    rejections: list[dict[str, str]] = []
    for r in replies:
        site = by_node[r.metadata.src_node_id]
        refused = is_declined(r)
        check = check_reply(r, declined if refused else answered)
        event = {"round": server_round, "site": site.site_id, "role": site.role}
        if not check.accepted:
            run._left_out(server_round, "evaluation", site.site_id, site.role, str(check.reason))
            rejections.append({"site": site.site_id, "reason": str(check.reason)})
        elif refused:
            reason = check.texts[REFUSAL_RECORD][REFUSAL_REASON]
            run._emit({"event": "evaluate-refused", **event, "reason": reason})
            refusals.append({"site": site.site_id, "reason": reason})
        else:
            scored.append((r, site, check.metrics))
    run.audit_event(
        "round-evaluated",
        round=server_round,
        evaluated=[site.site_id for _, site, _ in scored],
        refused=refusals,
        rejected=rejections,
        dropped=dropped,
    )
    for _, site, metrics in scored:
        for model, values in _by_model(metrics).items():
            event = {"event": "evaluate", "round": server_round, "site": site.site_id, "role": site.role}
            run._emit({**event, "split": "test", "model": model, "metrics": values})
    # The aggregate covers the training sites' test splits; unseen sites are reported apart.
    trained = [(r, s, m) for r, s, m in scored if s.role == ROLE_TRAIN]
    aggregated = strategy.aggregate_evaluate(server_round, _weighted_replies(trained, run.config))
    event = {"event": "aggregate-evaluate", "round": server_round, "role": ROLE_TRAIN}
    run._emit({**event, "metrics": dict(aggregated or {})})


def _by_model(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A reply's metrics split into the global model's and (FedBN) the personalised model's."""
    models = {"global": {k: v for k, v in metrics.items() if not k.startswith(PERSONAL_PREFIX)}}
    personal = {
        k.removeprefix(PERSONAL_PREFIX): v for k, v in metrics.items() if k.startswith(PERSONAL_PREFIX)
    }
    if personal:
        models["personal"] = {**personal, WEIGHT_KEY: metrics[WEIGHT_KEY]}
    return models


def _weighted_replies(
    scored: Sequence[tuple[Message, Site, dict[str, Any]]], config: RunConfig
) -> list[Message]:
    """The checked replies as the strategy aggregates them: the metrics every one sent, the weight capped."""
    if not scored:
        return []
    shared = set.intersection(*(set(m) for _, _, m in scored))
    reported = [float(m[WEIGHT_KEY]) for _, _, m in scored]
    weights = aggregation_weights(reported, [s.num_test for _, s, _ in scored], config.aggregation_weights)
    out = []
    for (reply, _, metrics), weight in zip(scored, weights, strict=True):
        values = {k: v for k, v in metrics.items() if k in shared}
        values[WEIGHT_KEY] = weight
        content = RecordDict({METRICS_RECORD: MetricRecord(values)})
        out.append(Message(content=content, metadata=copy.copy(reply.metadata)))
    return out
