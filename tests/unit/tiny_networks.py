"""Tiny networks for the tests of user networks (``fire import model``, the Network abstraction).

A standalone module file, as a user's would be: the import tests pass it as ``tiny_networks.py:FACTORY`` and it is
copied alone into checkpoints. Every network takes FP32 NCHW images in [0, 1] (8 x 8 grayscale digits by default)
and returns logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Unit(nn.Module):
    """A residual unit with functional activations: relu(bn(conv(x))) + x."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x))) + x


class TinyRes(nn.Module):
    """Stem, two residual units, a strided unit, global pooling in forward, a classifier."""

    def __init__(self, width: int = 8, classes: int = 10, channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.early = Unit(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
                                  nn.ReLU())
        self.late = Unit(2 * width)
        self.classify = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.late(self.down(self.early(F.relu(self.stem(x)))))
        return self.classify(x.mean(dim=(2, 3)))


class SkipAround(nn.Module):
    """The image itself is added back after ``body``: no cut at ``body`` is exact, so only the fused layout serves."""

    def __init__(self, width: int = 8, classes: int = 10, channels: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.bypass = nn.Conv2d(channels, width, 1)
        self.classify = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify((self.body(x) + self.bypass(x)).mean(dim=(2, 3)))


class Twice(nn.Module):
    """``shared`` runs twice per forward: it is no candidate layer (a hook there would fire twice)."""

    def __init__(self, width: int = 8, classes: int = 10, channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.shared = nn.Conv2d(width, width, 3, padding=1)
        self.classify = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(torch.relu(self.shared(torch.relu(self.stem(x)))))
        return self.classify(x.mean(dim=(2, 3)))


class TwoOutputs(nn.Module):
    """Returns (logits, features): not a classifier FIRE serves."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.classify = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(1)
        return self.classify(flat), flat


def build(width: int = 8, classes: int = 10) -> TinyRes:
    return TinyRes(width, classes)


def export(model: nn.Module, path: str, input_shape: tuple[int, ...] = (1, 8, 8), dynamic: bool = True) -> None:
    """What a user runs to ship the network as a .pt2 (eval mode, dynamic batch)."""
    example = (torch.rand(2, *input_shape),)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model, example, dynamic_shapes=shapes), path)
