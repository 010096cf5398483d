"""What came back from a batch of site messages: which nodes answered, which were lost and why."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from contract.packed_arrays import PackedRecords, any_packed, packed_content, unpacked_content

REPLY_POLL_S = 0.2
"""Seconds between two checks for the sites' replies. Flower 1.41's deployment grid waits 3 s between its
checks (``send_and_receive``), which adds up to 3 s to every message of a deployed run."""


def send_and_wait(grid: Any, messages: Sequence[Message], timeout_s: float) -> list[Message]:
    """Send ``messages`` and collect their replies until all came or ``timeout_s`` passed, checking every
    `REPLY_POLL_S` through the grid's own push / pull calls. A grid that is not a Flower `Grid` (the test
    grids, which answer at once) is asked through its ``send_and_receive``.

    Through a Flower Grid the messages' arrays travel packed (contract/packed_arrays.py): packed here,
    and the replies unpacked before they are returned."""
    if not isinstance(grid, Grid):
        return list(grid.send_and_receive(messages, timeout=timeout_s))
    packed: PackedRecords = {}  # the global model, packed once for every site
    for message in messages:
        if message.has_content():
            message.content = packed_content(message.content, packed)
    waiting = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while waiting:
        pulled = list(grid.pull_messages(waiting))
        replies += [_unpacked(reply) for reply in pulled]
        waiting -= {m.metadata.reply_to_message_id for m in pulled}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(REPLY_POLL_S)
    return replies


def _unpacked(reply: Message) -> Message:
    """``reply`` with its arrays unpacked; a reply whose packing is malformed stays as it came, and the
    screening refuses its arrays (server/update_screening.py: their names are not the model's)."""
    if reply.has_content() and any_packed(reply.content):
        try:
            reply.content = unpacked_content(reply.content)
        except ValueError:
            pass
    return reply


def short_reason(reason: str) -> str:
    # The simulation engine wraps a site's exception in layers of Ray tracebacks; its message is last.
    if "Message: " in reason:
        reason = reason.rsplit("Message: ", 1)[1]
    reason = reason.strip().rstrip(">'").strip()
    return reason if len(reason) <= 600 else reason[:600] + " ..."


def node_of_reply(messages: Sequence[Message]):
    """A function giving the node a reply answers for.

    The SuperLink answers for a node it lost (no heartbeat) with an error reply of its own: match replies
    to what was sent, not to their sender."""
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}

    def node_of(reply: Message) -> int:
        return sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    return node_of


def lost_nodes(
    messages: Sequence[Message],
    replies: Sequence[Message],
    timeout_s: float,
    known_cause: Callable[[int], str | None] | None = None,
) -> list[dict[str, Any]]:
    """``{"node_id", "reason"}`` of every node whose reply is an error or missing after ``timeout_s``.

    A message the SuperLink could not take (its node was revoked or left) comes back as an error reply
    answering no message of ours: its reason is given to the nodes that got no answer. ``known_cause``
    says what the coordinator knows of a node (e.g. that its operator revoked it), put before Flower's
    reason.
    """
    node_of = node_of_reply(messages)
    sent_to = {m.metadata.dst_node_id for m in messages}
    answered = {node_of(r) for r in replies}
    errors = [
        {"node_id": node_of(r), "reason": short_reason(r.error.reason)} for r in replies if r.has_error()
    ]
    undelivered = sorted({e["reason"] for e in errors if e["node_id"] not in sent_to})
    silent_reason = (
        f"the coordinator could not deliver the message ({'; '.join(undelivered)})"
        if undelivered
        else f"no answer within round-timeout-s = {timeout_s:.0f} s"
    )
    silent = [
        {"node_id": m.metadata.dst_node_id, "reason": silent_reason}
        for m in messages
        if m.metadata.dst_node_id not in answered
    ]
    lost = [e for e in errors if e["node_id"] in sent_to] + silent
    for entry in lost:
        if known_cause is not None and (cause := known_cause(entry["node_id"])):
            entry["reason"] = f"{cause} ({entry['reason']})"
    return lost


def no_contributor_reason(server_round: int, left_out: Sequence[Mapping[str, Any]]) -> str:
    """Why a training round had no contributor: each site left out, and how."""
    why = (
        "; ".join(f"{e['site']} {e['how']}: {e['reason']}" for e in left_out) or "no training site was asked"
    )
    return f"round {server_round}: no site's update could be used ({why}), so the run cannot go on"


class NodeView:
    """The part of a Grid a strategy's ``configure_*`` uses, limited to some nodes."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)
