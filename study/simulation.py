"""A whole federation on one machine: Flower's simulation engine runs the ServerApp and one ClientApp
per site folder, in process (Ray actors for the sites), leaving nothing running afterwards.

``neurofed simulate`` calls `run_simulation`; tests call it with hooks that see every message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.run_config import RunConfig
from contract.run_layout import site_folders
from models.errors import NeurofedError
from server.run_directory import RunDirectory

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

# A simulation never talks to the internet: no Flower telemetry, no Ray usage statistics. Both are read
# when flwr / ray are first imported, hence set here, before `run_simulation` imports them.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def backend_config(num_sites: int, cpus: int | None = None, ray_address: str | None = None) -> dict[str, Any]:
    """Ray settings: one CPU per concurrently running site, so sites run in parallel up to the core count
    and never oversubscribe (each site trains with one torch thread).

    Args:
        ray_address: an existing Ray cluster (``HOST:PORT`` of its head, or ``auto``) to run the sites on,
            whose nodes' CPUs it then uses; None starts a private Ray instance on this machine.
    """
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if ray_address:
        # Ray refuses CPU counts or a dashboard from a driver that joins a cluster: its nodes say what they have.
        return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"address": ray_address, **quiet}}
    cpus = cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(1, min(cpus, num_sites)), "num_gpus": 0, "include_dashboard": False, **quiet},
    }


def run_simulation(
    config: RunConfig,
    client_app: ClientApp,
    *,
    resume: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_message: Callable[[str, Any], None] | None = None,
    progress: bool = True,
    verbose: bool = False,
    site_secrets_seed: int | None = None,
    ray_address: str | None = None,
) -> RunDirectory:
    """Run (or resume) a federated run with ``config.num_sites`` simulated sites; returns its run directory.

    Args:
        config: the run settings; ``data_root`` must hold at least ``num_sites`` site folders. When
            resuming, the settings stored in ``config.run_dir`` win (only more rounds may be asked).
        client_app: the sites' ClientApp (``client.app.app``; a parameter, so tests and benchmarks can
            pass their own).
        resume: continue the run in ``config.run_dir`` from its last checkpoint.
        on_event / on_message: hooks, see `server.app.make_server_app`.
        progress: show the run's progress (server/run_progress.py: a bar on a terminal, a line per stage
            and per site result otherwise); False: print nothing.
        verbose: keep Flower's INFO log.
        site_secrets_seed: derive every site's secret from this seed (`fix_site_secrets`), for a
            benchmark that must repeat exactly; None (default): each site makes its own random secret.
        ray_address: run the sites on this existing Ray cluster (`backend_config`); every node needs this
            neurofed installed and ``config.data_root`` and ``config.run_dir`` at the same paths.
    """
    run_dir = RunDirectory(config.run_dir)
    if resume:
        stored = run_dir.read_config()
        config = stored.replace(run_dir=config.run_dir, num_rounds=max(stored.num_rounds, config.num_rounds))
    else:
        run_dir.check_new()
    folders = site_folders(Path(config.data_root))
    if len(folders) < config.num_sites:
        raise NeurofedError(
            f"data root {config.data_root} holds {len(folders)} site folder(s), fewer than the {config.num_sites} "
            "sites to simulate; synthesize more sites or simulate fewer"
        )

    if site_secrets_seed is not None and not resume:
        fix_site_secrets(Path(config.run_dir), folders[: config.num_sites], site_secrets_seed)

    from flwr.simulation import run_simulation as flower_run_simulation

    from contract.resume_settings import RESUME_SETTINGS_KEY, encode_resume_settings
    from server.app import RESUME_KEY, make_server_app

    resumed = {RESUME_SETTINGS_KEY: encode_resume_settings({"num-server-rounds": config.num_rounds})}
    server_app = make_server_app(
        {**config.to_flower(), RESUME_KEY: resume, **(resumed if resume else {})},
        on_event=on_event,
        on_message=on_message,
        progress=progress,
    )
    with _quiet_flower(verbose):
        flower_run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=config.num_sites,
            backend_config=backend_config(config.num_sites, ray_address=ray_address),
        )
    if not run_dir.final_model_path.is_file():
        raise NeurofedError(
            f"the simulation ended without a final model in {run_dir.root} (see the log above); "
            f"continue it with --resume {run_dir.root}"
        )
    return run_dir


def fix_site_secrets(run_dir: Path, site_dirs: list[Path], seed: int) -> None:
    """Write each simulated site's secret as ``SHA-256(seed, site)`` into its state in ``run_dir``.

    Only for a benchmark that must repeat exactly (its splits, patches and DP noise): anyone who knows
    the seed can replay every draw, so the run's ε then holds against nobody who knows it. Never the
    default (`neurofed simulate --fixed-site-secrets SEED`)."""
    import hashlib

    from client.site_secret import SECRET_FILE
    from common.atomic_files import atomic_write_bytes
    from contract.run_layout import SITE_STATE_DIR

    for site_dir in site_dirs:
        secret = hashlib.sha256(f"neurofed-fixed-site-secret|{seed}|{site_dir.name}".encode()).digest()
        atomic_write_bytes(run_dir / SITE_STATE_DIR / site_dir.name / SECRET_FILE, secret, mode=0o600)


@contextmanager
def _quiet_flower(verbose: bool):
    logger = logging.getLogger("flwr")
    level = logger.level
    if not verbose:
        # Site failures come back as error replies, reported by the ServerApp with the site's message.
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)

