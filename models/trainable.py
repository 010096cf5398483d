"""Which of a network's parameters a site trains: all of them, or a small subset for private fine-tuning.

Under DP-SGD the noise added to every step has the same standard deviation in every trained coordinate, so
its norm grows with the square root of the number of trained parameters while the clipped signal does not:
fine-tuning a few well-chosen parameters of a good starting model keeps far more of the signal (De et al.
2022; BitFit, Ben Zaken et al. 2022). The subsets are defined by module type and order, so they mean the
same thing for every architecture of models/networks.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.errors import NeurofedError

if TYPE_CHECKING:  # torch is imported where a network is at hand: the names below must import without it
    import torch
    from torch import nn

TRAINABLE_LAYERS: tuple[str, ...] = ("all", "norm", "norm+head")
"""``all``: every parameter. ``norm``: the normalization layers' scales and shifts, every bias and every
activation parameter (PReLU), about 0.2 % of the default network. ``norm+head``: ``norm`` plus the weights of
the last `HEAD_CONVOLUTIONS` convolutions in module order (the decoder's full-resolution stage and output
layer)."""

HEAD_CONVOLUTIONS = 4


def trainable_names(model: nn.Module, layers: str) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the parameters ``layers`` trains."""
    if layers not in TRAINABLE_LAYERS:
        raise NeurofedError(f"trainable layers {layers!r}: choose one of {', '.join(TRAINABLE_LAYERS)}")
    if layers == "all":
        return {name for name, _ in model.named_parameters()}
    from torch import nn

    norms = (nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm, nn.PReLU)
    names: set[str] = set()
    convolutions: list[str] = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for param_name, _ in module.named_parameters(recurse=False):
            if isinstance(module, norms) or param_name == "bias":
                names.add(prefix + param_name)
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            convolutions.append(prefix + "weight")
    if layers == "norm+head":
        names.update(convolutions[-HEAD_CONVOLUTIONS:])
    return names


def freeze_except(model: nn.Module, layers: str) -> int:
    """Set ``requires_grad`` on exactly the parameters ``layers`` trains; returns how many values they hold."""
    keep = trainable_names(model, layers)
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
        count += param.numel() if name in keep else 0
    return count


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require gradients, by name (detached)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
