"""The run directory: everything a federated run leaves behind, and what a resumed run starts from.

Its layout (file and folder names) is contract/run_layout.py's. Every file is written to a temporary
name in the same folder and moved into place (common/atomic_files.py), so an interrupted run never
leaves a half-written file; a checkpoint counts only once both of its files exist (the state file
``checkpoints/round-003.state.pt`` is written first, the model file ``checkpoints/round-003.pt`` last).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic_files import atomic_write
from contract.run_config import AUTO_CLIPPING_NORM, RunConfig
from contract.run_layout import CHECKPOINTS_DIR, CONFIG_FILE, FINAL_MODEL_FILE, METRICS_FILE
from models.errors import NeurofedError
from server.json_lines import append_json_line, json_safe, read_json_lines

_CHECKPOINT_RE = re.compile(r"round-(\d{3,})\.pt")


@dataclass(frozen=True)
class Checkpoint:
    """A global model after ``server_round`` and the strategy state to continue from it.

    Attributes:
        server_round: the last completed round (1-based).
        state_dict: parameter name -> tensor, the global model (CPU, float32 for float parameters).
        strategy_state: what the server strategy needs to continue (`server.strategies.strategy_state`).
    """

    server_round: int
    state_dict: dict[str, Any]
    strategy_state: dict[str, Any]


class RunDirectory:
    """Reads and writes one run directory (see the module docstring for its layout)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def final_model_path(self) -> Path:
        return self.root / FINAL_MODEL_FILE

    def checkpoint_path(self, server_round: int) -> Path:
        return self.checkpoints_dir / f"round-{server_round:03d}.pt"

    def strategy_state_path(self, server_round: int) -> Path:
        return self.checkpoints_dir / f"round-{server_round:03d}.state.pt"

    # -- config -------------------------------------------------------------------------------------

    def check_new(self) -> None:
        """Raise NeurofedError when this folder already holds a run."""
        if self.config_path.exists():
            raise NeurofedError(
                f"{self.root} already holds a run ({CONFIG_FILE} exists): continue it with "
                f"--resume {self.root}, or choose another output folder"
            )

    def start(self, config: RunConfig, extra: Mapping[str, Any] | None = None) -> None:
        """Begin a new run here: refuse a folder that already holds one, write ``config.json``.

        Args:
            config: the resolved run config.
            extra: further descriptions stored beside it (network config, preprocessing plan, ...).
        """
        self.check_new()
        self.root.mkdir(parents=True, exist_ok=True)
        document = {"run_config": config.to_dict(), **dict(extra or {})}
        atomic_write(self.config_path, lambda tmp: tmp.write_text(json.dumps(json_safe(document), indent=2)))

    def read_document(self) -> dict[str, Any]:
        """The whole ``config.json``: ``run_config`` plus the extra descriptions."""
        if not self.config_path.is_file():
            raise NeurofedError(
                f"{self.root} is not a run directory ({CONFIG_FILE} is missing): pass the folder a run "
                "wrote with --out"
            )
        try:
            return json.loads(self.config_path.read_text())
        except json.JSONDecodeError as exc:
            raise NeurofedError(
                f"{self.config_path} is not valid JSON ({exc}); the run cannot be resumed"
            ) from exc

    def read_config(self) -> RunConfig:
        return RunConfig.from_dict(self.read_document()["run_config"])

    def holds_run_of(self, config: RunConfig) -> bool:
        """Whether this folder's run was started with ``config``. The stored config has its automatic
        settings resolved (the clipping norm, server/global_model.py `with_clipping_norm`), so a setting
        ``config`` leaves automatic matches whatever value the run resolved it to."""
        stored = self.read_config()
        if config.dp_max_grad_norm == AUTO_CLIPPING_NORM:
            stored = stored.replace(dp_max_grad_norm=AUTO_CLIPPING_NORM)
        return stored == config

    # -- metrics ------------------------------------------------------------------------------------

    def append_event(self, event: Mapping[str, Any]) -> None:
        """Append one event as a JSON line and flush it to disk at once.

        Events have at least ``event`` (``train``, ``evaluate``, ``aggregate-train``,
        ``aggregate-evaluate``, ``sites``, ``finished``) and ``round``; per-site events also ``site``,
        ``role`` (``train``/``holdout``), ``split`` and ``metrics`` (name -> number); the ServerApp adds
        ``time`` (Unix seconds). Non-finite numbers are written as null.
        """
        append_json_line(self.metrics_path, event)

    def read_events(self) -> list[dict[str, Any]]:
        """Every event written so far, in order (a torn last line from a crash is skipped)."""
        return read_json_lines(self.metrics_path)

    def drop_events_after(self, server_round: int) -> None:
        """Remove events of rounds after ``server_round`` (what an interrupted round had logged)."""
        kept = [e for e in self.read_events() if int(e.get("round", 0)) <= server_round]
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in kept)
        atomic_write(self.metrics_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    # -- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(
        self,
        server_round: int,
        state_dict: Mapping[str, Any],
        strategy_state: Mapping[str, Any],
        write_model: Callable[[Path, Mapping[str, Any]], None],
    ) -> Path:
        """Write the global model and strategy state after ``server_round``; returns the model file.

        Args:
            write_model: writes a self-describing model file of ``state_dict`` to the given path,
                atomically (as models/model_file.save_model does).
        """
        import torch

        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(
            self.strategy_state_path(server_round), lambda tmp: torch.save(dict(strategy_state), tmp)
        )
        path = self.checkpoint_path(server_round)
        write_model(path, state_dict)
        return path

    def completed_rounds(self) -> list[int]:
        """Rounds with a complete checkpoint (model file and strategy state), ascending."""
        if not self.checkpoints_dir.is_dir():
            return []
        rounds = []
        for p in self.checkpoints_dir.iterdir():
            m = _CHECKPOINT_RE.fullmatch(p.name)
            if m and self.strategy_state_path(int(m.group(1))).is_file():
                rounds.append(int(m.group(1)))
        return sorted(rounds)

    def latest_checkpoint(self, read_model: Callable[[Path], dict[str, Any]]) -> Checkpoint | None:
        """The last complete checkpoint, or None when no round finished.

        Args:
            read_model: reads a model file written by ``write_model`` back into a state dict.
        """
        import torch

        rounds = self.completed_rounds()
        if not rounds:
            return None
        last = rounds[-1]
        state = torch.load(self.strategy_state_path(last), map_location="cpu", weights_only=True)
        return Checkpoint(
            server_round=last, state_dict=read_model(self.checkpoint_path(last)), strategy_state=state
        )
