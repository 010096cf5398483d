"""The link between the ClientApp's forwarder and the site's warm worker: where, who, and the frames.

One request per connection over a local Unix socket: the forwarder (client/worker_forwarder.py) sends
a header frame (JSON: the token, the contract version it speaks) and a frame holding the Flower Message
(protobuf, Flower's own serialization); the worker (client/site_worker.py) answers with a header frame
(its contract version, and an error or none) and a frame holding the reply's RecordDict.

Who may use the socket: it lives in the site's worker folder (mode 0700, owned by the worker's user;
0750 with ``--worker-group``: that group, the SuperNode's, may enter it), the socket is 0600 (0660), and
every request carries the secret in the folder's token file (0600 / 0640), compared in constant time.

Standard library only: the forwarder runs in every per-message ClientApp process and must start fast.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import socket
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.errors import NeurofedError

SOCKET_KEY = "worker-socket"
"""Node config key: the worker's socket path; when set, the ClientApp forwards every message there."""
TOKEN_KEY = "worker-token"
"""Node config key: the file holding the worker's token."""
SOCKET_FILE = "worker.sock"
TOKEN_FILE = "worker.token"
WORKER_DIR = "worker"
"""The worker's folder under the site's state folder."""
START_HINT = (
    "start the site with `neurofed-site start` (which runs and supervises the worker), or run "
    "`neurofed-site worker` with the site's options (systemd: neurofed-site-worker.service)"
)
_LENGTH = struct.Struct(">Q")
MAX_HEADER_BYTES = 64 * 1024


MAX_SOCKET_PATH_BYTES = 107
"""The longest path a Unix socket can be bound to on Linux (``sun_path`` is 108 bytes with its NUL)."""


def check_socket_path(sock: Path) -> None:
    """NeurofedError naming the path and what to do when ``sock`` is too long to be a Unix socket."""
    length = len(str(sock).encode())
    if length > MAX_SOCKET_PATH_BYTES:
        raise NeurofedError(
            f"the site worker's socket {sock} is {length} bytes long, more than the {MAX_SOCKET_PATH_BYTES} a "
            "Unix socket allows: give a shorter --worker-dir (e.g. /run/neurofed-site) or a shorter --state-dir"
        )


def worker_paths(state_dir: Path) -> tuple[Path, Path, Path]:
    """(folder, socket, token file) of the worker of the site whose state folder is ``state_dir``."""
    folder = state_dir.expanduser().resolve() / WORKER_DIR
    return folder, folder / SOCKET_FILE, folder / TOKEN_FILE


def forwarding_target(node_config: Mapping[str, Any]) -> tuple[Path, Path] | None:
    """(socket, token file) when the node config names a worker; None runs the handlers in-process."""
    sock = node_config.get(SOCKET_KEY)
    if not sock:
        return None
    token = node_config.get(TOKEN_KEY) or Path(str(sock)).with_name(TOKEN_FILE)
    return Path(str(sock)), Path(str(token))


def prepare_worker_folder(folder: Path, group: int | None = None) -> None:
    """Create the worker's folder (0700; 0750 and ``group`` when the SuperNode runs as another user)."""
    folder.mkdir(parents=True, exist_ok=True)
    if group is not None:
        os.chown(folder, -1, group)
    os.chmod(folder, 0o750 if group is not None else 0o700)


def ensure_token(path: Path, group: int | None = None) -> bytes:
    """The worker's token: read it, or create it once (32 random bytes, hex, mode 0600 / 0640)."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    if group is not None:
        os.chown(path, -1, group)
        os.chmod(path, 0o640)
    return read_token(path)


def read_token(path: Path) -> bytes:
    """The token in ``path``; NeurofedError saying what to do when it cannot be read."""
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise NeurofedError(
            f"site worker token {path}: cannot read it ({exc.strerror}); it is written by the site worker "
            f"at its start: {START_HINT}"
        ) from None
    if len(token) < 32:
        raise NeurofedError(f"site worker token {path}: too short; delete it and restart the site worker")
    return token


def token_matches(expected: bytes, given: str) -> bool:
    """Constant-time comparison of a request's token with the worker's."""
    return hmac.compare_digest(expected, given.encode("utf-8", "replace"))


def send_frames(conn: socket.socket, header: Mapping[str, Any], body: bytes) -> None:
    head = json.dumps(dict(header)).encode()
    conn.sendall(_LENGTH.pack(len(head)) + head + _LENGTH.pack(len(body)) + body)


def receive_frames(conn: socket.socket, max_body_bytes: int) -> tuple[dict[str, Any], bytes]:
    """One header and one body; ConnectionError when the peer closes early or a frame is too large."""
    head = _receive_frame(conn, MAX_HEADER_BYTES)
    header = json.loads(head)
    if not isinstance(header, dict):
        raise ConnectionError("malformed header")
    return header, _receive_frame(conn, max_body_bytes)


def _receive_frame(conn: socket.socket, limit: int) -> bytes:
    (size,) = _LENGTH.unpack(_receive_exactly(conn, _LENGTH.size))
    if size > limit:
        raise ConnectionError(f"frame of {size} bytes is over the limit of {limit}")
    return _receive_exactly(conn, size)


def _receive_exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the connection closed mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
