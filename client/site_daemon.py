"""`neurofed-site start`: check the site's data, then run Flower's SuperNode for this site.

The SuperNode connects to the coordinator over TLS (verifying it with the federation's CA certificate),
authenticates with the site's private key (enrolled at the coordinator), and runs the ClientApp
(client/app.py) with the site's data folder, id, state folder and privacy budget in its node config.
Runtime installation of app dependencies stays off: the site runs the neurofed installed here, offline.

It runs only the app bundles the site's operator approved (`neurofed-site approve`,
client/approved_apps.py): this process becomes client/approved_supernode.py, which checks every bundle
the coordinator sends before Flower stores it or starts any process that would run its code.

With a warm worker (``--worker supervised``, the default) the site runs two processes: the site worker
(client/site_worker.py), which holds the libraries, the network and the data and runs every handler,
and the SuperNode, whose per-message ClientApps only forward to it (client/worker_forwarder.py); this
process supervises both (client/worker_supervisor.py). ``--worker external``: the worker runs on its own
(`neurofed-site worker`, e.g. as a systemd unit); ``--worker off``: every message starts a ClientApp that
runs the handler itself.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from client.approved_apps import APPROVE_COMMAND, AUDIT_LOG_FILE, approved_apps_path, read_approved
from client.site_keys import check_private_key
from client.site_policy import parse_policy_options
from client.worker_link import SOCKET_KEY, TOKEN_KEY, check_socket_path, worker_paths
from common.flower_environment import flower_process_environment
from contract.version import CONTRACT_VERSION, CONTRACT_VERSION_KEY
from models.errors import NeurofedError

DEFAULT_STATE_DIR = Path("~/.neurofed/site")
DEFAULT_RUNTIME_PORT = 9094
WORKER_MODES = ("supervised", "external", "off")


@dataclass(frozen=True, kw_only=True)
class SiteDaemonConfig:
    """Everything `neurofed-site start` needs.

    Attributes:
        coordinator: the coordinator's ``HOST:PORT`` (HOST must be a name in its certificate).
        ca_cert: the federation's CA certificate (PEM).
        private_key: the site's SuperNode private key (`neurofed-site keygen`).
        data_dir: the site's data folder (checked first; never modified).
        budget_epsilon, budget_delta: the site's lifetime privacy budget (all runs together).
        state_dir: the site's own files: privacy ledger, preprocessed cache, personalised layers.
        site_id: the id the site declares to the coordinator (default: the data folder's name).
        role: ``train`` or ``holdout`` (evaluates only).
        runtime_port: local port of the SuperNode's runtime API (one per SuperNode on a machine).
        protocol, contrast: what `neurofed-site check` validates the data against.
        allow_no_dp: train rounds of runs without differential privacy too. Off by default: the site
            refuses such rounds whatever the coordinator asks (node config ``require-dp``).
        approved_apps: the file of approved app bundle hashes (default: ``<state-dir>/approved-apps.txt``).
        trusted_entities: Flower's trusted-entities YAML: bundles must also carry a signature of one of
            them (``flower-supernode --trusted-entities``; only bundles from Flower Hub are signed).
        worker: ``supervised`` (run and restart the site worker here), ``external`` (it runs on its
            own, e.g. under systemd) or ``off`` (every message's ClientApp runs the handler itself).
        worker_dir: the worker's socket and token folder (default ``<state-dir>/worker``).
        worker_group: the SuperNode's group, when it runs as another user than the worker.
    """

    coordinator: str = ""
    ca_cert: Path | None = None
    private_key: Path | None = None
    data_dir: Path
    budget_epsilon: float
    budget_delta: float = 1e-5
    state_dir: Path = DEFAULT_STATE_DIR
    site_id: str | None = None
    role: str = "train"
    runtime_port: int = DEFAULT_RUNTIME_PORT
    protocol: str = "tissue"
    contrast: str = "T1w"
    allow_no_dp: bool = False
    approved_apps: Path | None = None
    policy: tuple[str, ...] = ()
    """The site's own rules as ``KEY=VALUE`` (client/site_policy.py `POLICY_KEYS`): its split, evaluation
    limits and resource caps."""
    trusted_entities: Path | None = None
    worker: str = "supervised"
    worker_dir: Path | None = None
    worker_group: str | None = None

    @property
    def worker_socket(self) -> tuple[Path, Path]:
        """(socket, token file) of the site's worker."""
        _, sock, token = worker_paths(self.state_dir)
        if self.worker_dir is not None:
            folder = self.worker_dir.expanduser().resolve()
            sock, token = folder / sock.name, folder / token.name
        check_socket_path(sock)
        return sock, token

    @property
    def ledger_path(self) -> Path:
        return self.state_dir.expanduser() / "privacy-ledger.jsonl"

    @property
    def cache_dir(self) -> Path:
        return self.state_dir.expanduser() / "cache"

    @property
    def approved_apps_path(self) -> Path:
        return approved_apps_path(self.state_dir, self.approved_apps)

    @property
    def audit_log_path(self) -> Path:
        return self.state_dir.expanduser() / AUDIT_LOG_FILE


def node_config_values(config: SiteDaemonConfig) -> dict[str, str | float | int]:
    """What the site's ClientApp gets as its node config (read by client/site_setup.py's ``site_setup``)."""
    values: dict[str, str | float | int] = {
        "data-dir": str(config.data_dir.expanduser().resolve()),
        "site-id": config.site_id or config.data_dir.expanduser().resolve().name,
        "role": config.role,
        "state-dir": str(config.state_dir.expanduser().resolve()),
        "cache-dir": str(config.cache_dir.resolve()),
        "ledger": str(config.ledger_path.resolve()),
        "budget-epsilon": float(config.budget_epsilon),
        "budget-delta": float(config.budget_delta),
        "require-dp": "false" if config.allow_no_dp else "true",
        # What this installed neurofed speaks: the coordinator's app checks it (contract/version.py).
        CONTRACT_VERSION_KEY: CONTRACT_VERSION,
        **parse_policy_options(config.policy),
    }
    if config.worker != "off":
        sock, token = config.worker_socket
        values.update({SOCKET_KEY: str(sock), TOKEN_KEY: str(token)})
    return values


def node_config(config: SiteDaemonConfig) -> str:
    """The SuperNode's ``--node-config`` string of `node_config_values`."""
    parts = []
    for key, value in node_config_values(config).items():
        if isinstance(value, str):
            if "'" in value or '"' in value:
                raise NeurofedError(
                    f"{key} {value!r}: quotes are not allowed in paths and names passed to Flower"
                )
            parts.append(f"{key}='{value}'")
        else:
            parts.append(f"{key}={value!r}")
    return " ".join(parts)


def check_site_config(config: SiteDaemonConfig) -> None:
    """Check options and files; NeurofedError naming the option and what to do."""
    host, sep, port = config.coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise NeurofedError(
            f"--coordinator {config.coordinator!r}: expected HOST:PORT, e.g. coordinator.example.org:9092"
        )
    if config.ca_cert is None or not config.ca_cert.expanduser().is_file():
        raise NeurofedError(
            f"--ca {config.ca_cert}: file not found; ask the coordinator's operator for the CA certificate"
        )
    if config.private_key is None:
        raise NeurofedError("--key: pass the site's private key (site.key from `neurofed-site keygen`)")
    check_private_key(config.private_key)
    if config.trusted_entities is not None and not config.trusted_entities.expanduser().is_file():
        raise NeurofedError(f"--trusted-entities {config.trusted_entities}: file not found")
    if config.worker not in WORKER_MODES:
        raise NeurofedError(f"--worker {config.worker!r}: use one of {', '.join(WORKER_MODES)}")
    if config.worker != "external":
        # An external worker checks its own options and the data (`neurofed-site worker`): the SuperNode's
        # user need not be able to read the scans, and the worker's options are the ones enforced.
        check_site_options(config)


def check_site_options(config: SiteDaemonConfig) -> None:
    """Check the options about the site's data and budget (the worker's too)."""
    if not config.data_dir.expanduser().is_dir():
        raise NeurofedError(f"--data {config.data_dir}: not a folder; pass the site's data folder")
    if not config.budget_epsilon > 0:
        raise NeurofedError(
            f"--budget {config.budget_epsilon}: the lifetime ε must be positive, e.g. --budget 10"
        )
    if not 0 < config.budget_delta < 1:
        raise NeurofedError(f"--delta {config.budget_delta}: must be in (0, 1), e.g. 1e-5")
    if config.role not in ("train", "holdout"):
        raise NeurofedError(f"--role {config.role!r}: use train or holdout")


def check_approved_apps(config: SiteDaemonConfig) -> list[str]:
    """The approved bundle hashes; NeurofedError saying how to approve one when there is none."""
    path = config.approved_apps_path
    approved = read_approved(path)
    if not approved:
        raise NeurofedError(
            f"--approved-apps {path}: no approved app bundle, so the site would refuse every run; approve the "
            f"neurofed installed here with `{APPROVE_COMMAND} --installed --approved-apps {path}` (or a bundle "
            "file the coordinator's operator sent: BUNDLE.fab, or --hash SHA256)"
        )
    return approved


def check_site_data(config: SiteDaemonConfig) -> None:
    """Run `neurofed-site check` on the data folder (its table is printed); refuse unusable data."""
    from client.site_check import run_site_check

    if run_site_check(config.data_dir.expanduser(), protocol=config.protocol, contrast=config.contrast) != 0:
        raise NeurofedError(
            f"--data {config.data_dir}: no usable subject (see the reasons above); the site does not join "
            "until `neurofed-site check` finds usable subjects"
        )


def supernode_command(config: SiteDaemonConfig) -> list[str]:
    """This site's SuperNode: Flower's ``flower-supernode`` behind neurofed's approval check."""
    from client.approved_supernode import launcher_command

    _executable("flower-superexec")  # the SuperNode starts it by name
    return launcher_command(
        config.approved_apps_path.resolve(), config.audit_log_path.resolve(), supernode_arguments(config)
    )


def supernode_arguments(config: SiteDaemonConfig) -> list[str]:
    """The ``flower-supernode`` arguments of this site."""
    trusted = (
        []
        if config.trusted_entities is None
        else ["--trusted-entities", str(config.trusted_entities.expanduser().resolve())]
    )
    return [
        "--superlink",
        config.coordinator,
        "--root-certificates",
        str(config.ca_cert.expanduser().resolve()),
        "--auth-supernode-private-key",
        str(config.private_key.expanduser().resolve()),
        "--node-config",
        node_config(config),
        "--port",
        str(config.runtime_port),
        *trusted,
    ]


def supernode_environment(telemetry: bool = False) -> dict[str, str]:
    """The SuperNode's environment (common/flower_environment.py)."""
    return flower_process_environment(telemetry)


def _executable(name: str) -> str:
    import shutil

    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise NeurofedError(
            f"Flower's `{name}` command is not installed; install neurofed with its dependencies"
        )
    return found


def check_runtime_port(port: int) -> None:
    """NeurofedError when the SuperNode's local runtime port is taken (another site on this machine)."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise NeurofedError(
                f"--runtime-port {port}: the port is in use on this machine ({exc.strerror}), e.g. by another "
                f"site's SuperNode: give each site on one machine its own, e.g. --runtime-port {port + 1}"
            ) from None


def _make_state_dir(config: SiteDaemonConfig) -> Path:
    state_dir = config.state_dir.expanduser()
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise NeurofedError(f"--state-dir {config.state_dir}: cannot create it ({exc.strerror})") from exc
    return state_dir


def worker_command_of(config: SiteDaemonConfig) -> list[str]:
    """The command of this site's worker (client/site_worker.py), with the site's node config."""
    from client.site_worker import worker_command

    return worker_command(node_config(config), config.worker_group)


def start_site(config: SiteDaemonConfig, telemetry: bool = False) -> int:
    """Check the options and the data, then run the site: the SuperNode, and its worker unless
    ``worker`` is off (then this process becomes the SuperNode: ``exec``, never returns). With an
    external worker the data is the worker's to check: this process (the SuperNode's user) never reads it."""
    check_site_config(config)
    if config.worker != "external":
        check_site_data(config)
    check_approved_apps(config)
    check_runtime_port(config.runtime_port)
    state_dir = _make_state_dir(config)
    command = supernode_command(config)
    env = supernode_environment(telemetry)
    env.setdefault("FLWR_HOME", str(state_dir.resolve() / "flwr-home"))
    worker = {"off": "no worker", "external": f"the worker at {config.worker_socket[0]}"}.get(
        config.worker, "a supervised worker"
    )
    print(
        f"neurofed-site: joining {config.coordinator} as {node_config(config).split()[1]} "
        f"(ledger {config.ledger_path}, lifetime budget ε={config.budget_epsilon}, δ={config.budget_delta}; "
        f"{worker})",
        flush=True,
    )
    if config.worker == "supervised":
        from client.worker_supervisor import WorkerSupervisor, supervise

        supervisor = WorkerSupervisor(worker_command_of(config), env, config.worker_socket[0])
        return supervise(supervisor, command, env)
    os.execve(command[0], command, env)


def run_worker(config: SiteDaemonConfig) -> int:
    """`neurofed-site worker`: check the site's options and data, then become its worker (``exec``)."""
    check_site_options(config)
    check_site_data(config)
    _make_state_dir(config)
    command = worker_command_of(config)
    env = supernode_environment()
    os.execve(command[0], command, env)
