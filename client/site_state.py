"""What a site keeps between rounds: its personalised normalization layers (FedBN).

A FedBN site keeps the parameters and statistics of its normalization layers at home and sends only the
rest of the model. They are stored per round (``<state-dir>/personal-layers-round-003.pt``), so a
resumed run reads the layers of the round it continues from, never later ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from client.site_setup import SiteSetup
from common.atomic_files import atomic_write
from models.networks import normalization_keys

__all__ = ["latest_personal_layers", "normalization_keys", "personal_layers_path", "save_personal_layers"]


def personal_layers_path(setup: SiteSetup, server_round: int) -> Path:
    return setup.state_dir / f"personal-layers-round-{server_round:03d}.pt"


def latest_personal_layers(setup: SiteSetup, up_to_round: int) -> dict[str, torch.Tensor] | None:
    """The site's layers saved after the latest round <= ``up_to_round``, or None (never trained)."""
    for r in range(up_to_round, 0, -1):
        path = personal_layers_path(setup, r)
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
    return None


def save_personal_layers(setup: SiteSetup, server_round: int, layers: Mapping[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().cpu().clone() for k, v in layers.items()}
    atomic_write(personal_layers_path(setup, server_round), lambda tmp: torch.save(tensors, tmp))
