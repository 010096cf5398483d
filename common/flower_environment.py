"""The environment neurofed starts every Flower process with: SuperLink, SuperNode and `flwr` commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SUPEREXEC_TASK_POLL_S = 0.1
"""Seconds between two checks of Flower's SuperExec for a new task (a message's ClientApp, a run's
ServerApp); Flower's default, 1 s, adds up to a second to every message a site answers."""


def flower_process_environment(telemetry: bool = False) -> dict[str, str]:
    """This process's environment for a Flower process: offline, no runtime installs, no telemetry.

    The folder of this Python's scripts goes first on ``PATH``: Flower starts its helper processes
    (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) by name.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Air-gapped sites: Flower would otherwise `uv sync` the app's dependencies (GBs of CUDA torch).
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "1" if telemetry else "0"
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_TASK_POLL_S))
    return env
