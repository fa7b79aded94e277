"""Small stage adapters so that functional steps of a forward pass become splittable modules."""

from __future__ import annotations

import torch
from torch import nn


class Flatten(nn.Module):
    """Flatten all but the batch dimension (a view, as in the reference forward passes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


class Chain(nn.Module):
    """Run existing submodules in order without re-registering them under new names.

    Holding the modules in a plain tuple keeps the owning model's ``state_dict`` keys unchanged,
    which is what lets BackdoorBench checkpoints load without renaming.
    """

    def __init__(self, *steps: nn.Module) -> None:
        super().__init__()
        self._steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self._steps:
            x = step(x)
        return x
