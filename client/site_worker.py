"""The site's warm worker: ``python -P -m client.site_worker --node-config "..."``.

A long-running process of the site's installed neurofed that runs the ClientApp's handlers
(client/site_handlers.py) for the messages the per-message ClientApp processes forward to it
(client/worker_forwarder.py). It keeps torch, MONAI and Opacus imported and the site's preprocessed
data in memory (client/site_data.py keeps what it loaded), so a message costs what its handler does.

What the site guarantees stays here: the handlers run with the worker's own node config (the one the
site's operator gave `neurofed-site start`; a node config sent with a message is never read), so DP,
the privacy ledger, the caps, the split and the evaluation rules hold whatever the message asks.
Messages run one at a time (the ledger and the site's activity files have one writer). A request
without the worker's token, or from a bundle of another contract version, is refused before it is read
further. `neurofed-site start` starts and supervises it (client/worker_supervisor.py); systemd runs it
as its own unit (deploy/systemd/neurofed-site-worker.service).
"""

from __future__ import annotations

import argparse
import grp
import os
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from client.worker_link import (
    forwarding_target,
    prepare_worker_folder,
    receive_frames,
    send_frames,
    token_matches,
)
from contract.version import CONTRACT_VERSION, CONTRACT_VERSION_KEY, contract_mismatch
from models.errors import NeurofedError

WORKER_MODULE = "client.site_worker"
MAX_REQUEST_BYTES = 4 << 30
"""A message carries the global model's arrays."""


class SiteWorker:
    """Answers forwarded messages with the site's handlers, under the site's own node config."""

    def __init__(self, node_config: Mapping[str, Any], token: bytes) -> None:
        self.node_config = dict(node_config)
        self._token = token
        self._one_at_a_time = threading.Lock()

    def answer(self, header: Mapping[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        """The reply (header, RecordDict bytes) to one request (header, Message bytes)."""
        own = {"contract-version": CONTRACT_VERSION}
        if not token_matches(self._token, str(header.get("token", ""))):
            log("refused a request with a wrong token")
            return {**own, "error": "site worker: wrong token (the worker's token file was replaced?)"}, b""
        mismatch = contract_mismatch(header.get("contract-version"), CONTRACT_VERSION, "this site's worker")
        if mismatch is not None:
            log(f"refused a message: {mismatch}")
            return {**own, "error": mismatch}, b""
        try:
            return own, self._run_handler(body)
        except NeurofedError as exc:
            return {**own, "error": str(exc)}, b""
        except Exception as exc:  # the handler's failure goes back to the coordinator, the worker stays
            traceback.print_exc()
            return {**own, "error": f"site worker: {type(exc).__name__}: {exc}"}, b""

    def _run_handler(self, body: bytes) -> bytes:
        from flwr.app import Context, RecordDict
        from flwr.common.serde import message_from_proto, recorddict_to_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage

        from client.site_handlers import HANDLERS

        proto = ProtoMessage()
        proto.ParseFromString(body)
        msg = message_from_proto(proto)
        kind = msg.metadata.message_type.split(".")[0]
        if kind not in HANDLERS:
            raise NeurofedError(f"site worker: no handler for message type {msg.metadata.message_type!r}")
        context = Context(
            run_id=msg.metadata.run_id,
            node_id=msg.metadata.dst_node_id,
            node_config=self.node_config,
            state=RecordDict(),
            run_config={},
        )
        with self._one_at_a_time:
            started = time.monotonic()
            log(f"{kind} of run {msg.metadata.run_id}: handling")
            reply = HANDLERS[kind](msg, context)
            log(f"{kind} of run {msg.metadata.run_id}: answered in {time.monotonic() - started:.1f} s")
        return recorddict_to_proto(reply.content).SerializeToString()


class _Connection(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        if not self.request.recv(1, socket.MSG_PEEK):
            return  # closed without a byte: a readiness probe (client/worker_supervisor.py `answers`)
        try:
            header, body = receive_frames(self.request, MAX_REQUEST_BYTES)
        except (ConnectionError, ValueError) as exc:
            log(f"dropped a malformed request ({exc})")
            return
        reply, content = self.server.worker.answer(header, body)
        try:
            send_frames(self.request, reply, content)
        except OSError as exc:
            log(f"could not send a reply: the ClientApp went away ({exc})")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, worker: SiteWorker, group: int | None) -> None:
        self.worker = worker
        old = os.umask(0o177)  # the socket is created 0600
        try:
            super().__init__(str(path), _Connection)
        finally:
            os.umask(old)
        if group is not None:
            os.chown(path, -1, group)
            os.chmod(path, 0o660)


def _claim_socket(path: Path) -> None:
    """Remove a stale socket file; NeurofedError when a live worker already answers there."""
    if not path.exists():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        if probe.connect_ex(str(path)) == 0:
            raise NeurofedError(f"another site worker already serves {path}; stop it first")
    path.unlink()


def serve(node_config: Mapping[str, Any], group: int | None = None) -> None:
    """Load the handlers, then answer forwarded messages until SIGTERM / SIGINT."""
    from client.site_setup import site_setup
    from client.worker_link import ensure_token
    from contract.run_config import RunConfig

    target = forwarding_target(node_config)
    if target is None:
        raise NeurofedError("site worker: the node config names no 'worker-socket'")
    sock_path, token_path = target
    setup = site_setup(node_config, RunConfig())  # checks the site's node config before serving
    if setup.contract_version != CONTRACT_VERSION:
        raise NeurofedError(
            f"site worker: node config {CONTRACT_VERSION_KEY} {setup.contract_version} is not this "
            f"neurofed's {CONTRACT_VERSION}; restart the site with `neurofed-site start`"
        )
    import client.site_handlers  # noqa: F401  (torch, MONAI, Opacus: paid once, here)

    prepare_worker_folder(sock_path.parent, group)
    token = ensure_token(token_path, group)
    _claim_socket(sock_path)
    server = _Server(sock_path, SiteWorker(node_config, token), group)

    def stop(signum: int, _frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(f"serving site {setup.site_id} at {sock_path} (pid {os.getpid()}, contract version {CONTRACT_VERSION})")
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        sock_path.unlink(missing_ok=True)
        log("stopped")


def log(text: str) -> None:
    print(f"neurofed-site worker: {text}", flush=True)


def worker_command(node_config: str, group: str | None = None) -> list[str]:
    """The command that runs a worker (``-P``: nothing in the working folder stands in for neurofed)."""
    return [sys.executable, "-P", "-m", WORKER_MODULE, "--node-config", node_config] + (
        ["--group", group] if group else []
    )


def main(argv: Sequence[str] | None = None) -> int:
    from flwr.common.config import parse_config_args

    parser = argparse.ArgumentParser(prog=f"python -m {WORKER_MODULE}")
    parser.add_argument("--node-config", required=True, help="the site's node config (as the SuperNode's)")
    parser.add_argument("--group", help="the SuperNode's group, when it runs as another user")
    args = parser.parse_args(argv)
    try:
        group = grp.getgrnam(args.group).gr_gid if args.group else None
        serve(parse_config_args([args.node_config]), group)
    except (NeurofedError, KeyError, ValueError) as exc:
        print(f"neurofed-site worker: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
