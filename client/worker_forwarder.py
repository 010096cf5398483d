"""The ClientApp's side of the warm worker: send the message to the site's worker, return its reply.

A deployed SuperNode starts a fresh ClientApp process for every message; with a worker the process only
forwards (no torch, MONAI or Opacus import, no data read), so a message costs a process start. The
worker answers with the reply's records, or with the error the handler raised, which is raised here so
that Flower reports it to the coordinator as it reports an in-process handler's error.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.common.serde import message_to_proto, recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from client.worker_link import START_HINT, read_token, receive_frames, send_frames
from contract.version import CONTRACT_VERSION, contract_mismatch
from models.errors import NeurofedError

MAX_REPLY_BYTES = 4 << 30
"""A reply carries the model's arrays: allow far more than any network the contract knows."""


def forward(msg: Message, target: tuple[Path, Path]) -> Message:
    """The worker's reply to ``msg``; NeurofedError when there is no worker or it refuses the message."""
    sock_path, token_path = target
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(str(sock_path))
        except OSError as exc:
            raise NeurofedError(
                f"no site worker answers at {sock_path} ({exc.strerror}): {START_HINT}"
            ) from None
        header = {"token": read_token(token_path).decode(), "contract-version": CONTRACT_VERSION}
        try:
            send_frames(conn, header, message_to_proto(msg).SerializeToString())
            reply, body = receive_frames(conn, MAX_REPLY_BYTES)
        except (ConnectionError, OSError) as exc:
            raise NeurofedError(
                f"the site worker at {sock_path} stopped while handling the message ({exc}); "
                "`neurofed-site start` restarts it, and the coordinator drops this site from the round"
            ) from None
    return _reply(msg, reply, body)


def _reply(msg: Message, header: Mapping[str, Any], body: bytes) -> Message:
    worker_version = header.get("contract-version")
    mismatch = contract_mismatch(CONTRACT_VERSION, worker_version, "this site's worker")
    if header.get("error"):
        raise NeurofedError(str(header["error"]))
    if mismatch is not None:
        raise NeurofedError(mismatch)
    records = ProtoRecordDict()
    records.ParseFromString(body)
    return Message(content=recorddict_from_proto(records), reply_to=msg)
