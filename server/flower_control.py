"""Talk to a SuperLink's Control API through Flower's own command line (`flwr`), over TLS.

`flwr` reads its SuperLink connections from ``$FLWR_HOME/config.toml``; `FlowerControl` writes a private
one (connection ``neurofed``: the coordinator's address and CA certificate) into a temporary folder for
each use, so nothing of the operator's own Flower setup is read or changed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from common.flower_environment import flower_process_environment
from models.errors import NeurofedError
from server.coordinator_state import Connection

CONNECTION_NAME = "neurofed"


def flower_environment(flwr_home: Path | None = None, telemetry: bool = False) -> dict[str, str]:
    """The environment of a Flower command (common/flower_environment.py), with ``FLWR_HOME`` if given."""
    env = flower_process_environment(telemetry)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def flower_executable(name: str) -> str:
    """Path of a Flower command installed beside this Python, else on ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise NeurofedError(
            f"Flower's `{name}` command is not installed; install neurofed with its dependencies"
        )
    return found


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


class FlowerControl:
    """A temporary Flower home with one connection to the coordinator; use as a context manager."""

    def __init__(self, connection: Connection) -> None:
        ca = connection.ca_cert.expanduser().resolve()
        if not ca.is_file():
            raise NeurofedError(
                f"--ca {connection.ca_cert}: file not found; pass the federation's CA certificate"
            )
        self.connection = Connection(connection.address, ca)
        self._home: Path | None = None

    def __enter__(self) -> FlowerControl:
        self._home = Path(tempfile.mkdtemp(prefix="neurofed-flwr-"))
        (self._home / "config.toml").write_text(
            "[superlink]\n"
            f"default = {_toml_string(CONNECTION_NAME)}\n\n"
            f"[superlink.{CONNECTION_NAME}]\n"
            f"address = {_toml_string(self.connection.address)}\n"
            f"root-certificates = {_toml_string(str(self.connection.ca_cert))}\n"
        )
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    @property
    def environment(self) -> dict[str, str]:
        if self._home is None:
            raise RuntimeError("FlowerControl is used outside its `with` block")
        return flower_environment(self._home)

    def command(self, *args: str) -> list[str]:
        """``flwr ARGS...`` (callers add the connection name where the sub-command takes it)."""
        return [flower_executable("flwr"), *args]

    def call_json(self, args: Sequence[str], what: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Run ``flwr ARGS --format json`` and return its JSON answer; NeurofedError when it fails."""
        try:
            done = subprocess.run(
                self.command(*args, "--format", "json"),
                env=self.environment,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise NeurofedError(
                f"{what}: the coordinator at {self.connection.address} did not answer within {timeout_s:.0f} s; "
                "check that `neurofed coordinator start` is running and reachable"
            ) from exc
        answer = _last_json_object(done.stdout)
        if done.returncode != 0 or answer is None or not answer.get("success", False):
            reason = (answer or {}).get("error-message") or (done.stderr.strip() or done.stdout.strip())
            raise NeurofedError(
                f"{what} failed at the coordinator {self.connection.address}: {reason.strip()[-800:]}; check "
                "that the coordinator is running, that --ca is the CA that signed its certificate, and that "
                "the address is a name in that certificate"
            )
        return answer


def _last_json_object(text: str) -> dict[str, Any] | None:
    # `flwr --format json` prints its JSON answer last, possibly after log lines.
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
            return value if isinstance(value, dict) else None
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None
