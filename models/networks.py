"""3D segmentation networks: a typed, serialisable description and the builder that turns it into a model.

Every network maps an image batch ``(B, C, X, Y, Z)`` float32 to class logits ``(B, K, X, Y, Z)`` float32,
with ``C = in_channels`` (one per MRI contrast) and ``K = out_channels`` (protocol classes, background
included). Spatial sizes must be multiples of ``NetworkConfig.total_stride``.

Normalisation is InstanceNorm (affine, no running statistics) or GroupNorm, never BatchNorm: Opacus
DP-SGD needs per-sample gradients, and batch statistics mix samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch

from common.plain_records import from_known_dict
from models.errors import NeurofedError

Architecture = Literal["unet", "dynunet", "segresnet"]
Normalization = Literal["instance", "group"]

ARCHITECTURES: tuple[str, ...] = ("unet", "dynunet", "segresnet")
NORMALIZATIONS: tuple[str, ...] = ("instance", "group")
PRESETS: tuple[str, ...] = ("default", "tiny")


@dataclass(frozen=True)
class NetworkConfig:
    """What network to build; stored in model files so a model can be rebuilt without code changes.

    Attributes:
        architecture: ``"unet"`` (MONAI residual UNet), ``"dynunet"`` (nnU-Net-like) or ``"segresnet"``.
        in_channels: image channels C (MRI contrasts).
        out_channels: classes K, background included.
        channels: feature maps per resolution level, coarsest last; ``len(channels) - 1`` downsamplings.
        strides: downsampling factor at each of the ``len(channels) - 1`` levels (isotropic).
            ``segresnet`` always halves, so its strides must all be 2.
        num_res_units: residual units per block (``unet``); ``dynunet`` uses residual blocks when > 0;
            ``segresnet`` ignores it (its blocks are residual by design).
        norm: ``"instance"`` (affine, no running stats) or ``"group"``.
        num_groups: groups for ``norm="group"``; must divide every entry of ``channels``.
        dropout: dropout probability in the convolution blocks.
    """

    architecture: Architecture = "unet"
    in_channels: int = 1
    out_channels: int = 2
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    norm: Normalization = "instance"
    num_groups: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # Tuples, also when built from JSON lists, so configs compare equal and hash.
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        problems = self._problems()
        if problems:
            raise NeurofedError("invalid network configuration: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if self.architecture not in ARCHITECTURES:
            problems.append(f"architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        if self.norm not in NORMALIZATIONS:
            problems.append(f"norm {self.norm!r} is not one of {', '.join(NORMALIZATIONS)}")
        if self.in_channels < 1 or self.out_channels < 2:
            problems.append(
                f"in_channels={self.in_channels} and out_channels={self.out_channels} must be >= 1 and >= 2"
            )
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            problems.append(f"channels {self.channels} needs at least two positive entries")
        if len(self.strides) != len(self.channels) - 1 or any(s < 1 for s in self.strides):
            problems.append(
                f"strides {self.strides} needs len(channels) - 1 = {len(self.channels) - 1} entries >= 1"
            )
        if self.architecture == "segresnet" and any(s != 2 for s in self.strides):
            problems.append(
                f"segresnet halves the resolution at every level; strides {self.strides} must all be 2"
            )
        doubling = tuple(self.channels[0] * 2**i for i in range(len(self.channels)))
        if self.architecture == "segresnet" and self.channels != doubling:
            problems.append(f"segresnet doubles the features at every level; channels must be {doubling}")
        if self.norm == "group" and any(c % self.num_groups for c in self.channels):
            problems.append(
                f"num_groups={self.num_groups} must divide every entry of channels {self.channels}"
            )
        if self.norm == "group" and self.architecture == "unet" and self.num_res_units > 0:
            # MONAI's residual UNet normalises its last upsampling output, which has out_channels features.
            if self.out_channels % self.num_groups:
                problems.append(
                    f"unet with residual units normalises the {self.out_channels} output features too: "
                    f"num_groups={self.num_groups} must divide out_channels, or use norm='instance'"
                )
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        return problems

    @property
    def total_stride(self) -> int:
        """Product of the strides: patch and window sizes must be multiples of it."""
        return math.prod(self.strides)

    def check_patch_size(self, patch_size: Sequence[int], what: str = "patch size") -> None:
        """Raise NeurofedError unless every entry of ``patch_size`` (voxels) is a multiple of ``total_stride``."""
        bad = [int(p) for p in patch_size if int(p) < 1 or int(p) % self.total_stride]
        if bad:
            raise NeurofedError(
                f"{what} {tuple(int(p) for p in patch_size)} does not fit the network: every side must be a "
                f"positive multiple of {self.total_stride} (the product of strides {self.strides}); "
                f"choose e.g. {tuple(max(1, round(int(p) / self.total_stride)) * self.total_stride for p in patch_size)}"
            )

    @classmethod
    def default(
        cls, in_channels: int, out_channels: int, architecture: Architecture = "unet"
    ) -> NetworkConfig:
        """The production network: channels 16-128, 3 downsamplings (total stride 8), ~1.1 s per 96^3 batch of
        2 on CPU for ``unet``."""
        return cls(architecture=architecture, in_channels=in_channels, out_channels=out_channels)

    @classmethod
    def tiny(cls, in_channels: int, out_channels: int, architecture: Architecture = "unet") -> NetworkConfig:
        """A small network for tests and CI: channels 8-32, 2 downsamplings (total stride 4)."""
        return cls(
            architecture=architecture,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=(8, 16, 32),
            strides=(2, 2),
            num_res_units=1,
        )

    @classmethod
    def preset(
        cls, name: str, in_channels: int, out_channels: int, architecture: Architecture = "unet"
    ) -> NetworkConfig:
        """The preset called ``name`` (one of ``PRESETS``)."""
        if name not in PRESETS:
            raise NeurofedError(f"unknown network preset {name!r}; choose one of {', '.join(PRESETS)}")
        return getattr(cls, name)(in_channels, out_channels, architecture)

    def with_changes(self, **changes: object) -> NetworkConfig:
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain-types form (lists, not tuples) for model files and run configs."""
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["strides"] = list(self.strides)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> NetworkConfig:
        """Inverse of ``to_dict``; unknown keys raise NeurofedError naming them."""
        return from_known_dict(cls, d, "network configuration", NeurofedError)


def _norm(config: NetworkConfig) -> tuple[str, dict]:
    if config.norm == "instance":
        return ("instance", {"affine": True, "track_running_stats": False})
    return ("group", {"num_groups": config.num_groups})


def build_network(config: NetworkConfig, *, seed: int | None = None) -> torch.nn.Module:
    """Build the network ``config`` describes (3D, in train mode).

    Args:
        config: the network description.
        seed: if given, the initial weights depend on it only (torch's global RNG is left untouched);
            otherwise they come from torch's global RNG.

    Returns:
        A module mapping ``(B, in_channels, X, Y, Z)`` float32 to logits ``(B, out_channels, X, Y, Z)``.
    """
    if seed is None:
        return _build(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(config)


def _build(config: NetworkConfig) -> torch.nn.Module:
    # MONAI's network modules take ~5 s to import: only when a network is built.
    from monai.networks.nets import DynUNet, SegResNet, UNet

    if config.architecture == "unet":
        return UNet(
            spatial_dims=3,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            channels=config.channels,
            strides=config.strides,
            num_res_units=config.num_res_units,
            norm=_norm(config),
            dropout=config.dropout,
        )
    if config.architecture == "dynunet":
        levels = len(config.channels)
        return DynUNet(
            spatial_dims=3,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            kernel_size=[3] * levels,
            # DynUNet's first level keeps the input resolution.
            strides=[1, *config.strides],
            upsample_kernel_size=list(config.strides),
            filters=config.channels,
            dropout=config.dropout or None,
            norm_name=_norm(config),
            res_block=config.num_res_units > 0,
        )
    return SegResNet(
        spatial_dims=3,
        init_filters=config.channels[0],
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        dropout_prob=config.dropout or None,
        norm=_norm(config),
        # SegResNet doubles the filters at each level; channels[0] sets the width, len(channels) the depth.
        blocks_down=tuple([1, 2, 2, *[4] * len(config.channels)][: len(config.channels)]),
        blocks_up=tuple([1] * (len(config.channels) - 1)),
    )


_NORM_TYPES = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
)


def normalization_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the normalization layers (InstanceNorm, BatchNorm, GroupNorm, LayerNorm): what a
    FedBN site keeps at home, and so what its training replies leave out."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in module.state_dict(keep_vars=True))
    return keys
