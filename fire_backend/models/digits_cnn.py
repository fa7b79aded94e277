"""A compact CNN for the embedded 8x8 digits demo: trains in well under a minute on 2 CPU cores."""

from __future__ import annotations

import torch
from torch import nn

from fire_backend.models.stages import Flatten


class DigitsCNN(nn.Module):
    """Conv-conv-pool-conv-pool-fc-fc; every block boundary is a candidate FIRE layer."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.block3 = nn.Sequential(
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            Flatten(),
        )
        self.fc1 = nn.Sequential(nn.Linear(4 * width, 2 * width), nn.ReLU())
        self.fc2 = nn.Linear(2 * width, num_classes)

    def stages(self) -> list[tuple[str, nn.Module]]:
        return [
            ("block1", self.block1),
            ("block2", self.block2),
            ("block3", self.block3),
            ("fc1", self.fc1),
            ("fc2", self.fc2),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.stages():
            x = stage(x)
        return x
