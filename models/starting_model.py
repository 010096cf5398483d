"""Starting models: the weights a federation (or a baseline) begins from, and what they were trained on.

A run starts from ``initial-model``: ``builtin`` (the project's own model, shipped in this package, trained by
`neurofed pretrain` on public anatomy only), ``none`` (random initial weights from the run seed), or the path
of a model file. A starting model must be the run's network, protocol and preprocessing geometry
(`check_fits`); its provenance (public data, ε = 0 for every site, the content hash of every anatomy it saw)
travels into the run's records and report (`describe`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from models.errors import NeurofedError

PRETRAINED_KIND = "pretrained-public"
"""``training["kind"]`` of a model file written by `neurofed pretrain`."""
BUILTIN = "builtin"
NO_STARTING_MODEL = "none"
BUILTIN_FILE = "tissue-2mm-unet-default.pt"
"""The shipped starting model, in models/pretrained/ (made by the command in BENCHMARKS.md, "Starting model")."""

PLAN_GEOMETRY_KEYS = ("target_spacing_mm", "field_of_view_mm", "clip_percentiles", "normalization")
"""The preprocessing decisions a starting model and a run must share (not the contrast's name: the starting
model is trained on every contrast)."""


def builtin_path() -> Path:
    """The shipped starting model's file, in the installed neurofed.

    A deployed coordinator runs its ServerApp from a Flower app bundle, which holds only source files (no
    model weights) and is imported ahead of the installation; the weights are then found through the
    installed distribution (a wheel's files, or an editable install's source folder).
    """
    relative = Path("models", "pretrained", BUILTIN_FILE)
    beside = Path(str(resources.files("models"))) / "pretrained" / BUILTIN_FILE
    if beside.is_file():
        return beside
    try:
        dist = importlib.metadata.distribution("neurofed")
    except importlib.metadata.PackageNotFoundError:
        return beside
    installed = Path(str(dist.locate_file(relative)))
    if installed.is_file():
        return installed
    source = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    if source.startswith("file://"):
        editable = Path(source.removeprefix("file://")) / relative
        if editable.is_file():
            return editable
    return beside


def resolve(spec: str) -> Path | None:
    """The model file ``spec`` names (``builtin``, ``none`` or a path); None for ``none``.

    Raises:
        NeurofedError: the file does not exist (naming it, and what to do).
    """
    if spec == NO_STARTING_MODEL:
        return None
    path = builtin_path() if spec == BUILTIN else Path(spec)
    if not path.is_file():
        what = "the built-in starting model" if spec == BUILTIN else "starting model"
        raise NeurofedError(
            f"{what} {path} does not exist; give a model file with --initial-model PATH, make one with "
            "`neurofed pretrain -o MODEL.pt`, or start from random weights with --initial-model none"
        )
    return path


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of a model file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class StartingModel:
    """A starting model file, loaded, with its identity and provenance.

    Attributes:
        spec: what the run asked for (``builtin`` or a path).
        path: the file.
        sha256: digest of the file's bytes.
        state_dict: its weights.
        network: `NetworkConfig.to_dict()` of its network.
        protocol: its label protocol's name.
        plan: its preprocessing plan (plain dict).
        training: its provenance (plain dict).
    """

    spec: str
    path: Path
    sha256: str
    state_dict: Mapping
    network: dict
    protocol: str
    plan: dict
    training: dict

    @property
    def public_only(self) -> bool:
        """Whether the file says it was trained on public data only (ε = 0 for every site)."""
        return bool(self.training.get("public_data_only")) and self.training.get("kind") == PRETRAINED_KIND

    def anatomy_hashes(self) -> set[str]:
        """Content hashes of every label map (and phantom) it was trained on."""
        return {a["sha256"] for a in self.training.get("anatomy", []) if "sha256" in a}

    def saw_phantoms(self) -> bool:
        """Whether the built-in phantom generator was part of its training anatomy."""
        return any(a.get("kind") == "phantom" for a in self.training.get("anatomy", []))

    def public_gradient_norm(self, layers: str) -> float | None:
        """Median per-patch gradient norm of ``layers`` (models/trainable.py) on public data, measured when
        the model was pretrained; None when the file has no such measurement."""
        norms = (self.training.get("public_gradient_norms") or {}).get(layers) or {}
        value = norms.get("p50")
        return float(value) if isinstance(value, int | float) and value > 0 else None

    def describe(self) -> dict:
        """What a run records and its report shows of its starting model (plain types)."""
        anatomy = self.training.get("anatomy", [])
        return {
            "spec": self.spec,
            "file": self.path.name,
            "sha256": self.sha256,
            "kind": self.training.get("kind", "unknown"),
            "public_data_only": self.public_only,
            "site_epsilon": 0.0 if self.public_only else None,
            "label_maps": [a["name"] for a in anatomy if a.get("kind") == "label_map"],
            "label_map_sha256": sorted(a["sha256"] for a in anatomy if a.get("kind") == "label_map"),
            "phantoms": sum(1 for a in anatomy if a.get("kind") == "phantom"),
            "steps": (self.training.get("setup") or {}).get("steps", self.training.get("steps")),
            "date": self.training.get("date"),
        }

    def check_fits(self, network: Mapping, protocol: str, plan: Mapping | None = None) -> None:
        """Raise NeurofedError unless this model is ``network`` for ``protocol`` on ``plan``'s geometry."""
        problems = []
        if dict(network) != dict(self.network):
            differing = sorted(k for k in set(network) | set(self.network) if network.get(k) != self.network.get(k))
            problems.append(
                "network " + ", ".join(f"{k} {self.network.get(k)!r} (run: {network.get(k)!r})" for k in differing)
            )
        if protocol != self.protocol:
            problems.append(f"protocol {self.protocol!r} (run: {protocol!r})")
        for key in PLAN_GEOMETRY_KEYS if plan is not None else ():
            if list(_as_list(plan.get(key))) != list(_as_list(self.plan.get(key))):
                problems.append(f"preprocessing {key} {self.plan.get(key)!r} (run: {plan.get(key)!r})")
        if problems:
            raise NeurofedError(
                f"starting model {self.path} does not fit this run: it has " + "; ".join(problems) + ". Run "
                "with the starting model's settings, make a starting model for these settings with `neurofed "
                "pretrain`, or start from random weights with --initial-model none"
            )


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def load_starting_model(spec: str) -> StartingModel | None:
    """The starting model ``spec`` names (None for ``none``), read with `models.model_file.load_model`."""
    from models.model_file import load_model

    path = resolve(spec)
    if path is None:
        return None
    loaded = load_model(path)
    return StartingModel(
        spec=spec,
        path=path,
        sha256=file_digest(path),
        state_dict=loaded.model.state_dict(),
        network=loaded.network.to_dict(),
        protocol=loaded.protocol.name,
        plan=dict(loaded.plan),
        training=dict(loaded.training),
    )
