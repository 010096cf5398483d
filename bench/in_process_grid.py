"""Sites answering in this process: the part of a Flower Grid `server.federated_run.FederatedRun` uses,
delivering each message straight to the ClientApp (client/app.py) of simulated site ``node - 100``.

No Flower engine, no processes: for tests that tamper with a site's reply (tests/test_federation_privacy.py)
and for benchmarks of many short runs (bench/bench_poisoning.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from contract.wire import METRICS_RECORD, REFUSAL_REASON, REFUSAL_RECORD, REFUSED_KEY, WEIGHT_KEY

FIRST_NODE = 100
"""Node id of site 0; site i is node ``FIRST_NODE + i``."""

Tamper = Callable[[int, Message, Message], Message]
"""``tamper(site_index, instruction, reply) -> the reply the coordinator gets`` (training messages)."""


class InProcessGrid:
    """``n_sites`` simulated sites of the run's data root, or the sites of ``node_configs``.

    Args:
        tamper: may replace a site's training reply.
        evaluating: the sites (indices) that answer evaluations; the others decline them at once
            (default: every site evaluates).
        node_configs: each site's node config, as a deployed site's SuperNode hands it to the ClientApp
            (client/site_daemon.py `node_config_values`); default: the simulation's partition of site i.
    """

    def __init__(
        self,
        n_sites: int,
        tamper: Tamper | None = None,
        evaluating: Collection[int] | None = None,
        node_configs: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        configs = node_configs or [{"partition-id": i, "num-partitions": n_sites} for i in range(n_sites)]
        self.contexts = {
            FIRST_NODE + i: Context(
                run_id=1, node_id=FIRST_NODE + i, node_config=dict(config), state=RecordDict(), run_config={}
            )
            for i, config in enumerate(configs)
        }
        self.tamper = tamper
        self.evaluating = set(range(n_sites) if evaluating is None else evaluating)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        from flwr.supercore.task_identity import TaskIdentity

        from client.app import app

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            kind = message.metadata.message_type
            # A reply's sender is the process's node identity, which a SuperNode would set.
            TaskIdentity.node_id = node
            try:
                if kind == "evaluate" and node - FIRST_NODE not in self.evaluating:
                    reply = _declined(message)
                else:
                    reply = app(message, self.contexts[node])
                if self.tamper is not None and kind == "train":
                    reply = self.tamper(node - FIRST_NODE, message, reply)
            finally:
                TaskIdentity.node_id = 0
            replies.append(reply)
        return replies


def _declined(message: Message) -> Message:
    metrics = MetricRecord({REFUSED_KEY: 1, WEIGHT_KEY: 0})
    reason = ConfigRecord({REFUSAL_REASON: "this site does not evaluate in this benchmark"})
    return Message(RecordDict({METRICS_RECORD: metrics, REFUSAL_RECORD: reason}), reply_to=message)
