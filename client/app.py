"""The site's Flower ClientApp: ``query``, ``train`` and ``evaluate``.

``app`` is what ``flwr run .`` and ``neurofed simulate`` load
(``[tool.flwr.app.components] clientapp = "client.app:app"``). What each handler does is in
client/site_handlers.py. Where it runs depends on the node config:

- it names a worker socket (``worker-socket``, written by `neurofed-site start`): the message is
  forwarded to the site's warm worker (client/site_worker.py), which runs the handler with the imports,
  network and data already loaded and the site's own node config. This process imports no torch.
- otherwise (simulation, or a site started with ``--worker off``): the handler runs in this process.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.worker_link import forwarding_target
from contract.packed_arrays import answer_as_sent

app = ClientApp()


def _handle(kind: str, msg: Message, context: Context) -> Message:
    # The coordinator packs the model's arrays for the trip (contract/packed_arrays.py): the handler and
    # the worker see them unpacked, and the reply goes back packed the same way.
    return answer_as_sent(msg, lambda unpacked: _reply(kind, unpacked, context))


def _reply(kind: str, msg: Message, context: Context) -> Message:
    target = forwarding_target(context.node_config)
    if target is not None:
        from client.worker_forwarder import forward

        return forward(msg, target)
    from client.site_handlers import HANDLERS

    handler: Callable[[Message, Context], Message] = HANDLERS[kind]
    return handler(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Describe the site: id, role, contract version, subject counts, preprocessing plan."""
    return _handle("query", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model locally; reply with its arrays and metrics (or the site's refusal)."""
    return _handle("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on the site's test split (or the site's refusal)."""
    return _handle("evaluate", msg, context)
