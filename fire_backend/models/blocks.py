"""Small building blocks the reference networks share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Flatten(nn.Module):
    """Flatten all but the batch dimension (a view, as in the reference forward passes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


class NormalizedConv2d(nn.Conv2d):
    """A convolution that first standardizes its input per channel: conv((x - mean) / std).

    For weights trained on normalized images (BackdoorBench's pipeline): the network then takes [0, 1] images like
    every FIRE model. Keeps the convolution's own parameter names (so state dicts load unchanged); mean and std are
    non-persistent buffers, rebuilt from the network's constructor arguments.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(mean) != self.in_channels or len(std) != self.in_channels or min(std) <= 0:
            raise ValueError(f"need {self.in_channels} means and {self.in_channels} positive stds, got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - self.mean) / self.std)


def first_conv(mean: Sequence[float] | None, std: Sequence[float] | None, *args, **kwargs) -> nn.Conv2d:
    """The network's first convolution: normalizing its input when ``mean`` and ``std`` are given."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std for input normalization, or neither")
    return nn.Conv2d(*args, **kwargs) if mean is None else NormalizedConv2d(mean, std, *args, **kwargs)
