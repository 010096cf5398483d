"""The model file: weights plus everything needed to use them correctly, in one self-describing file.

A model file is a ``torch.save`` of a plain dict (loadable with ``torch.load(weights_only=True)``, so
opening one never runs code)::

    format           "neurofed-model"
    format_version   int, FORMAT_VERSION when written
    network          NetworkConfig.to_dict()
    protocol         LabelProtocol.to_dict()
    plan             the preprocessing plan (dict of plain values; opaque here)
    training         provenance: run id, rounds, sites, epsilon if DP, steps, seed, date, ...
    postprocessing   the label-map post-processing its outputs are scored and used with
                     (models/postprocessing.py); absent in older files, which read as "none"
    software_version the neurofed version that wrote it
    state_dict       parameter name -> tensor (CPU)

Files are written to a temporary name in the target folder and renamed, so a crash never leaves a
half-written model under the final name.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from common.atomic_files import atomic_write
from models.errors import NeurofedError
from models.label_protocols import LabelProtocol
from models.networks import NetworkConfig, build_network
from models.postprocessing import NO_POSTPROCESSING, POSTPROCESSING_MODES, check_postprocessing

FORMAT_MARKER = "neurofed-model"
FORMAT_VERSION = 2
"""Bumped when the layout changes incompatibly; files of a newer version are refused with a clear message.
2 added ``postprocessing``: a neurofed that reads only version 1 would ignore it and write label maps unlike
the ones the model was evaluated with, so it refuses the file instead; version 1 files read as ``none``."""

_PLAIN_SCALARS = (str, int, float, bool, type(None))


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a model's weights: each array's name (without Opacus' ``_module.`` prefix) and bytes, in
    name order. The coordinator and every site compute it from the arrays themselves, so it names one
    model however it was stored or sent (the final model's hash in both audit logs, deploy/README.md)."""
    digest = hashlib.sha256()
    named = {name.removeprefix("_module."): tensor for name, tensor in state_dict.items()}
    for name in sorted(named):
        digest.update(name.encode())
        digest.update(named[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def installed_version() -> str:
    """The installed neurofed version, or ``"unknown"`` when running from an uninstalled checkout."""
    try:
        return importlib.metadata.version("neurofed")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


PATCH_SIZE_KEY = "patch_size"
"""The training provenance's patch size (voxels, a list of 3): segmentation slides windows of that size, as
the model's evaluation did (`LoadedModel.patch_size`)."""


@dataclass(frozen=True)
class LoadedModel:
    """A model file's network, ready for inference, and its description.

    Attributes:
        path: the file it was read from.
        model: the network with the file's weights, in eval mode, on the requested device.
        network: how the network was built.
        protocol: the label protocol of its output classes.
        plan: the preprocessing plan its inputs must follow (plain dict).
        training: provenance of the weights (plain dict).
        software_version: neurofed version that wrote the file.
        format_version: layout version of the file.
        weights_sha256: `weights_sha256` of its weights (compare it with the audit logs' model hash).
        postprocessing: the post-processing mode its label maps get (models/postprocessing.py).
    """

    path: Path
    model: torch.nn.Module
    network: NetworkConfig
    protocol: LabelProtocol
    plan: dict
    training: dict
    software_version: str
    format_version: int
    weights_sha256: str = ""
    postprocessing: str = NO_POSTPROCESSING

    def patch_size(self) -> tuple[int, ...] | None:
        """The patch (voxels) the weights were trained on, which their evaluation slid over the grid: the
        provenance's `PATCH_SIZE_KEY`, or its ``training_config``'s (`neurofed train`, `neurofed pretrain`);
        None where the file does not record it."""
        recorded = self.training.get(PATCH_SIZE_KEY) or (self.training.get("training_config") or {}).get(
            "patch_size"
        )
        return tuple(int(v) for v in recorded) if recorded else None


def _check_plain(value: object, where: str) -> None:
    """Raise NeurofedError unless ``value`` is built from str/int/float/bool/None, lists, tuples and str-keyed dicts."""
    if isinstance(value, _PLAIN_SCALARS):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise NeurofedError(f"model file metadata {where}: key {key!r} must be a string")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise NeurofedError(
        f"model file metadata {where} is a {type(value).__name__}; only plain values (str, int, float, bool, "
        "None, lists, dicts) can be stored: convert it (e.g. with to_dict(), float(), str())"
    )


def save_model(
    path: str | os.PathLike,
    model_state_dict: Mapping[str, torch.Tensor],
    *,
    network: NetworkConfig,
    protocol: LabelProtocol,
    plan: Mapping,
    training: Mapping,
    software_version: str | None = None,
    postprocessing: str = NO_POSTPROCESSING,
) -> Path:
    """Write a model file atomically; returns its path.

    Args:
        path: destination; its folder must exist. An existing file is replaced only once the new one is complete.
        model_state_dict: the network's weights; Opacus' ``_module.`` prefix is removed.
        network: the configuration the weights belong to.
        protocol: the label protocol of the output classes (``protocol.num_classes == network.out_channels``).
        plan: the preprocessing plan as a plain dict.
        training: provenance as a plain dict (run id, rounds, sites, epsilon if DP, steps, seed, date).
        software_version: defaults to the installed neurofed version.
        postprocessing: the post-processing mode the model was evaluated with, which segmentation applies.
    """
    path = Path(path)
    check_postprocessing(postprocessing, f"cannot save {path}: post-processing")
    if network.out_channels != protocol.num_classes:
        raise NeurofedError(
            f"cannot save {path}: the network predicts {network.out_channels} classes but protocol "
            f"{protocol.name!r} has {protocol.num_classes}"
        )
    _check_plain(dict(plan), "plan")
    _check_plain(dict(training), "training")
    if not path.parent.is_dir():
        raise NeurofedError(f"cannot save {path}: folder {path.parent} does not exist; create it first")
    content = {
        "format": FORMAT_MARKER,
        "format_version": FORMAT_VERSION,
        "network": network.to_dict(),
        "protocol": protocol.to_dict(),
        "plan": dict(plan),
        "training": dict(training),
        "software_version": software_version or installed_version(),
        "postprocessing": postprocessing,
        "state_dict": {
            name.removeprefix("_module."): tensor.detach().cpu().clone()
            for name, tensor in model_state_dict.items()
        },
    }
    atomic_write(path, lambda tmp: torch.save(content, tmp))
    return path


def load_model(
    path: str | os.PathLike, expected_protocol: str | None = None, *, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Read a model file and rebuild its network with its weights (eval mode).

    Args:
        path: the model file.
        expected_protocol: if given, the protocol name the model must have been trained for.
        device: where to put the network.

    Raises:
        NeurofedError: the file is missing, unreadable (truncated, corrupt), not a neurofed model file,
            written by a newer neurofed, trained for another protocol, or its weights do not fit its network.
    """
    path = Path(path)
    if not path.is_file():
        raise NeurofedError(f"model file {path} does not exist; check the path")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file: report them all the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NeurofedError(
            f"model file {path} cannot be read: it is truncated, corrupt or not a neurofed model file "
            f"({reason}); copy or export it again"
        ) from None
    if not isinstance(content, dict) or content.get("format") != FORMAT_MARKER:
        raise NeurofedError(
            f"{path} is not a neurofed model file (no {FORMAT_MARKER!r} marker); use a file written by "
            "neurofed (e.g. the model a federated run exports)"
        )
    version = content.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise NeurofedError(f"model file {path} has an invalid format_version {version!r}; it is corrupt")
    if version > FORMAT_VERSION:
        raise NeurofedError(
            f"model file {path} has format version {version}, newer than the {FORMAT_VERSION} this neurofed "
            f"{installed_version()} reads (written by neurofed {content.get('software_version', '?')}); "
            "upgrade neurofed"
        )
    try:
        network = NetworkConfig.from_dict(content["network"])
        protocol = LabelProtocol.from_dict(content["protocol"])
        state_dict = content["state_dict"]
        plan, training = dict(content["plan"]), dict(content["training"])
    except (KeyError, TypeError, ValueError, NeurofedError) as e:
        raise NeurofedError(
            f"model file {path} has damaged metadata ({e}); copy or export it again"
        ) from None
    postprocessing = content.get("postprocessing", NO_POSTPROCESSING)
    if postprocessing not in POSTPROCESSING_MODES:
        raise NeurofedError(
            f"model file {path} asks for post-processing {postprocessing!r}, which this neurofed "
            f"{installed_version()} does not know (written by neurofed {content.get('software_version', '?')}); "
            "upgrade neurofed"
        )
    if expected_protocol is not None and protocol.name != expected_protocol:
        raise NeurofedError(
            f"model file {path} was trained for label protocol {protocol.name!r}, not {expected_protocol!r}: "
            f"use a model trained for {expected_protocol!r} or select protocol {protocol.name!r}"
        )
    model = build_network(network)
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError) as e:
        reason = str(e).strip().splitlines()[0]
        raise NeurofedError(
            f"model file {path}: its weights do not fit the network it describes ({reason}); the file is damaged"
        ) from None
    model.to(device).eval()
    return LoadedModel(
        path=path,
        model=model,
        network=network,
        protocol=protocol,
        plan=plan,
        training=training,
        software_version=str(content.get("software_version", "unknown")),
        format_version=version,
        weights_sha256=weights_sha256(state_dict),
        postprocessing=postprocessing,
    )
