"""Per-sample gradients from one vmapped forward/backward pass (``torch.func``), for Opacus' DPOptimizer.

Each sample of a batch runs through the network with its own view of the weights (the weights expanded
along a new batch axis, no copy), under ``torch.vmap``. One ordinary backward pass then leaves the
gradient of every sample's loss in the expanded views: the per-sample gradients, with no extra forward,
no per-layer re-computation (Opacus "functorch" mode) and no unfolded convolution inputs (Opacus "hooks"
mode). For 3D convolutions PyTorch batches the per-sample weights as a grouped convolution, so a DP step
costs about as much as a plain one.

The model must be vmappable (pure tensor code, no in-place updates of buffers, no data-dependent Python
control flow) and must not mix samples (no BatchNorm): MONAI's UNet, DynUNet and SegResNet with
InstanceNorm or GroupNorm are.
"""

from __future__ import annotations

from functools import partial

import torch
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.utils.module_utils import trainable_parameters
from torch import nn
from torch.func import functional_call, vmap

GROUPED_NDIM = 6
"""Dimensions of a grouped batch of 3-D images: (units, inputs per unit, channels, X, Y, Z)."""


class VmapGradSampleModule(AbstractGradSampleModule):
    """Wraps a network so that a backward pass sets ``p.grad_sample`` of shape ``(B, *p.shape)`` per parameter.

    ``p.grad_sample[i]`` is the gradient of sample ``i``'s loss (the batch loss rescaled by ``B`` for
    ``loss_reduction="mean"``, as Opacus does), which Opacus' ``DPOptimizer`` clips and noises. ``p.grad``
    is not set by the backward pass: the DP optimizer writes it in ``step``.

    Forward maps ``(B, ...)`` to the network's output for the batch; in eval mode or without autograd it is
    the plain network.
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean") -> None:
        if not batch_first:
            raise NotImplementedError("VmapGradSampleModule needs batch-first inputs")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r} must be 'mean' or 'sum'")
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction)
        tied = _parameters_in_several_modules(m)
        if tied:
            raise NotImplementedError(
                f"parameters shared by several modules ({', '.join(tied[:3])}) are not supported by the vmap "
                "per-sample mode; use grad_sample_mode='functorch'"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` is ``(B, C, X, Y, Z)``, or ``(B, K, C, X, Y, Z)`` for ``K`` inputs of each of ``B`` privacy
        units (augmentation multiplicity): then a unit's per-sample gradient is that of its loss over its
        ``K`` outputs, and the output is ``(B, K, ...)``."""
        if not (self.training and torch.is_grad_enabled()) or x.shape[0] == 0:
            if x.ndim == GROUPED_NDIM:
                return self._module(x.flatten(0, 1)).unflatten(0, x.shape[:2])
            return self._module(x)
        batch = x.shape[0]
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        per_sample_weights = {}
        for name, param in trainable_parameters(self._module):
            weights = param.detach().unsqueeze(0).expand(batch, *param.shape).requires_grad_(True)
            weights.register_hook(partial(_store_grad_sample, param, scale))
            per_sample_weights[name] = weights
        # Dropout draws a different mask for every sample, as it would in a plain batch.
        return vmap(self._forward_one, randomness="different")(per_sample_weights, x)

    def _forward_one(self, weights: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        # tie_weights=False: with ties, torch 2.13 leaves the swapped-in tensors in networks that reach one
        # submodule by two paths (MONAI's DynUNet). A submodule reached twice is still one object, so the
        # swap applies on both paths; parameters shared by distinct modules are refused in __init__.
        if sample.ndim == GROUPED_NDIM - 1:  # the K inputs of one unit: one batch of K
            return functional_call(self._module, weights, (sample,), tie_weights=False)
        return functional_call(self._module, weights, (sample.unsqueeze(0),), tie_weights=False).squeeze(0)

    def remove_hooks(self) -> None:
        """Nothing to remove: the per-sample hooks live on tensors of one forward pass."""


def _parameters_in_several_modules(module: nn.Module) -> list[str]:
    """Names of parameters that are the same tensor in distinct submodules (tied weights)."""
    owners: dict[int, set[int]] = {}
    names: dict[int, str] = {}
    for module_name, submodule in module.named_modules(remove_duplicate=False):
        for param_name, param in submodule.named_parameters(recurse=False):
            owners.setdefault(id(param), set()).add(id(submodule))
            names.setdefault(id(param), f"{module_name}.{param_name}".lstrip("."))
    return [names[key] for key, modules in owners.items() if len(modules) > 1]


def _store_grad_sample(param: nn.Parameter, scale: float, grad: torch.Tensor) -> None:
    if getattr(param, "grad_sample", None) is not None:
        # As Opacus' GradSampleModule with Poisson sampling: a second backward pass before the optimizer
        # step would mix two batches in one step and break the accounting.
        raise ValueError(
            "per-sample gradients of the previous batch were not used: call optimizer.step() or "
            "optimizer.zero_grad() between backward passes (gradient accumulation is not supported)"
        )
    param.grad_sample = grad.detach() * scale
