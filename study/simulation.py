"""A whole federation on one machine: Flower's simulation engine runs the ServerApp and one ClientApp
per site folder, in process (Ray actors for the sites), leaving nothing running afterwards.

``neurofed simulate`` calls `run_simulation`; tests call it with hooks that see every message.
"""

from __future__ import annotations

import logging
import math
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


def backend_config(num_sites: int, cpus: int | None = None) -> dict[str, Any]:
    """Ray settings: one CPU per concurrently running site, so sites run in parallel up to the core count
    and never oversubscribe (each site trains with one torch thread)."""
    cpus = cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(1, min(cpus, num_sites)),
            "num_gpus": 0,
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": False,
        },
    }


def run_simulation(
    config: RunConfig,
    client_app: ClientApp,
    *,
    resume: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_message: Callable[[str, Any], None] | None = None,
    live: bool | None = None,
    verbose: bool = False,
    site_secrets_seed: int | None = None,
) -> RunDirectory:
    """Run (or resume) a federated run with ``config.num_sites`` simulated sites; returns its run directory.

    Args:
        config: the run settings; ``data_root`` must hold at least ``num_sites`` site folders. When
            resuming, the settings stored in ``config.run_dir`` win (only more rounds may be asked).
        client_app: the sites' ClientApp (``client.app.app``; a parameter, so tests and benchmarks can
            pass their own).
        resume: continue the run in ``config.run_dir`` from its last checkpoint.
        on_event / on_message: hooks, see `server.app.make_server_app`.
        live: True: show the live progress view; False: print nothing; None (default): the live view on
            a terminal, else one line per round.
        verbose: keep Flower's INFO log.
        site_secrets_seed: derive every site's secret from this seed (`fix_site_secrets`), for a
            benchmark that must repeat exactly; None (default): each site makes its own random secret.
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

    from server.app import RESUME_KEY, make_server_app

    on_terminal = _is_terminal()
    view = LiveView(config) if (live if live is not None else on_terminal) else None
    lines = PlainProgress() if live is None and not on_terminal else None

    def event_hook(event: dict[str, Any]) -> None:
        if view is not None:
            view.update(event)
        if lines is not None:
            lines.update(event)
        if on_event is not None:
            on_event(event)

    server_app = make_server_app(
        {**config.to_flower(), RESUME_KEY: resume}, on_event=event_hook, on_message=on_message
    )
    with _quiet_flower(verbose), view if view is not None else _nothing():
        flower_run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=config.num_sites,
            backend_config=backend_config(config.num_sites),
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


def _is_terminal() -> bool:
    from rich.console import Console

    return Console().is_terminal


@contextmanager
def _nothing():
    yield


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


class LiveView:
    """A live table of the run: the stage, and per site its role, last training loss and test Dice."""

    def __init__(self, config: RunConfig) -> None:
        from rich.live import Live

        self.config = config
        self.stage = "starting the simulation engine"
        self.round = 0
        self.rows: dict[str, dict[str, Any]] = {}
        self._live = Live(self._render(), refresh_per_second=4, transient=False)

    def __enter__(self) -> LiveView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.update(self._render())
        self._live.__exit__(*exc)

    def update(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "round-start":
            self.round, self.stage = int(event["round"]), str(event["stage"])
        elif kind == "sites":
            for s in event["sites"]:
                self.rows.setdefault(s["site"], {"role": s["role"]})
        elif kind == "train":
            row = self.rows.setdefault(event["site"], {"role": event["role"]})
            row["loss"] = event["metrics"].get("train-loss")
            if "epsilon" in event:
                row["epsilon"] = event["epsilon"]
        elif kind in ("refused", "rejected", "evaluate-refused"):
            row = self.rows.setdefault(event["site"], {"role": event["role"]})
            row["note"] = f"round {event['round']} {kind}"
            if "epsilon" in event:
                row["epsilon"] = event["epsilon"]
        elif kind == "evaluate":
            key = "dice" if event.get("model") == "global" else "dice_personal"
            self.rows.setdefault(event["site"], {"role": event["role"]})[key] = event["metrics"].get(
                "dice-mean"
            )
        elif kind == "checkpoint":
            self.stage = "checkpoint written"
        elif kind == "finished":
            self.stage = "finished"
        self._live.update(self._render())

    def _render(self):
        from rich.table import Table

        def fmt(v: Any) -> str:
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

        title = f"round {self.round}/{self.config.num_rounds} ({self.config.strategy}): {self.stage}"
        table = Table(title=title, title_justify="left")
        for col in ("site", "role", "train loss", "test Dice (global)"):
            table.add_column(col)
        personal = self.config.strategy == "fedbn"
        if personal:
            table.add_column("test Dice (personal)")
        if self.config.dp:
            table.add_column(f"ε (run, δ={self.config.dp_delta:g})")
        table.add_column("note")
        for site, row in sorted(self.rows.items()):
            cells = [site, row.get("role", ""), fmt(row.get("loss")), fmt(row.get("dice"))]
            if personal:
                cells.append(fmt(row.get("dice_personal")))
            if self.config.dp:
                cells.append(fmt(row.get("epsilon")))
            cells.append(row.get("note", ""))
            table.add_row(*cells)
        return table


class PlainProgress:
    """One printed line per finished training and evaluation round (for logs, where a live view cannot draw)."""

    def update(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "aggregate-train":
            loss = event["metrics"].get("train-loss")
            print(
                f"round {event['round']}: trained, mean site loss {loss:.4f}" if loss is not None else "",
                flush=True,
            )
        elif kind in ("refused", "rejected", "evaluate-refused"):
            print(f"round {event['round']}: {event['site']} {kind}: {event['reason']}", flush=True)
        elif kind == "train" and "epsilon" in event:
            print(
                f"round {event['round']}: {event['site']} ε={event['epsilon']:.3f} (run so far)", flush=True
            )
        elif kind == "evaluate" and event.get("model") == "global":
            dice = event["metrics"].get("dice-mean")
            shown = "n/a" if dice is None or math.isnan(dice) else f"{dice:.3f}"
            print(f"round {event['round']}: {event['site']} ({event['role']}) test Dice {shown}", flush=True)
