"""An exponential moving average (EMA) of a network's trained parameters over optimizer steps.

Averaging the iterates of (DP-)SGD is post-processing: it costs no privacy, and the average carries less of
each step's noise than the last iterate does. A site releases the average in place of its last weights
(run setting ``ema-decay``).
"""

from __future__ import annotations

import torch
from torch import nn


class WeightAverage:
    """``average = decay * average + (1 - decay) * weights`` after every `update`, over the parameters that
    require gradients (the frozen ones never change); starts at the weights it is created with."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay} must be in [0, 1)")
        self.decay = float(decay)
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.average = {n: p.detach().clone() for n, p in self._params.items()}

    def update(self) -> None:
        with torch.no_grad():
            for name, param in self._params.items():
                self.average[name].mul_(self.decay).add_(param.detach(), alpha=1.0 - self.decay)

    def copy_to_model(self) -> None:
        """Overwrite the model's trained parameters with their average."""
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(self.average[name])
