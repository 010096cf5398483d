"""The coordinator's state directory: where the SuperLink, the runs and the audit log keep their files.

Layout of ``STATE_DIR`` (chosen with ``neurofed coordinator start --state-dir``)::

    superlink.db        Flower's SuperLink database (runs, enrolled SuperNodes); survives restarts
    coordinator.json    how the operator commands reach this coordinator (address, CA certificate)
    sites.json          enrolled sites: name -> public key, Flower node id (server/site_registry.py)
    audit.jsonl         the audit log (server/audit_log.py)
    runs/<name>/        one run directory per federated run (server/run_directory.py)
    flwr-home/          Flower's own home folder (installed app bundles)

The SuperLink is started with `STATE_DIR_ENV` set to this folder; the ServerApp it runs reads it to place
run directories and the audit log here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from common.atomic_files import atomic_write
from models.errors import NeurofedError

STATE_DIR_ENV = "NEUROFED_COORDINATOR_STATE_DIR"
"""Environment variable naming the coordinator's state directory, set for the SuperLink's processes."""


@dataclass(frozen=True)
class Connection:
    """How an operator command reaches the coordinator's Control API.

    Attributes:
        address: ``HOST:PORT`` to connect to (a name in the coordinator's TLS certificate).
        ca_cert: the CA certificate (PEM) that signed the coordinator's certificate.
    """

    address: str
    ca_cert: Path


@dataclass(frozen=True)
class CoordinatorState:
    """Paths inside one coordinator state directory (see the module docstring)."""

    root: Path

    @property
    def database_path(self) -> Path:
        return self.root / "superlink.db"

    @property
    def connection_path(self) -> Path:
        return self.root / "coordinator.json"

    @property
    def registry_path(self) -> Path:
        return self.root / "sites.json"

    @property
    def audit_path(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @classmethod
    def from_environment(cls) -> CoordinatorState | None:
        """The state directory the SuperLink was started with, or None (simulation, tests)."""
        value = os.environ.get(STATE_DIR_ENV)
        return cls(Path(value)) if value else None

    def resolve_run_dir(self, run_dir: str) -> Path:
        """Where a deployed run's ``run-dir`` lies: a relative one inside this state directory. A deployed
        run writes nowhere else: an absolute path outside it, a ``..`` step or a link leading out is a
        NeurofedError (a submitted job must not choose where the coordinator's service writes)."""
        path = Path(run_dir)
        root = self.root.resolve()
        inside = (path if path.is_absolute() else self.root / path).resolve()
        if ".." in path.parts or not inside.is_relative_to(root):
            raise NeurofedError(
                f"run setting 'run-dir' {run_dir!r}: a deployed run writes only inside the coordinator's state "
                f"folder {self.root}; use a relative path without '..', e.g. runs/NAME"
            )
        return path if path.is_absolute() else self.root / path

    def create(self) -> None:
        """Create the folder (owner-only: it holds the database and the audit log)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.runs_dir.mkdir(exist_ok=True)

    def write_connection(self, connection: Connection) -> None:
        document = {"address": connection.address, "ca_cert": str(connection.ca_cert)}
        atomic_write(self.connection_path, lambda tmp: tmp.write_text(json.dumps(document, indent=2)))

    def read_connection(self) -> Connection:
        """The coordinator's address and CA certificate as `neurofed coordinator start` recorded them."""
        if not self.connection_path.is_file():
            raise NeurofedError(
                f"--state-dir {self.root}: no coordinator was started with this state directory "
                f"({self.connection_path.name} is missing); run `neurofed coordinator start --state-dir "
                f"{self.root} ...` first, or pass --coordinator HOST:PORT and --ca CA.crt"
            )
        document = json.loads(self.connection_path.read_text())
        return Connection(address=str(document["address"]), ca_cert=Path(document["ca_cert"]))
