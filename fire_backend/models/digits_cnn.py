"""A compact CNN for the embedded 8x8 digits demo: trains in well under a minute on 2 CPU cores."""

from __future__ import annotations

import torch
from torch import nn

from fire_backend.models.blocks import Flatten


class DigitsCNN(nn.Module):
    """Conv-conv-pool-conv-pool-fc-fc; each block (``block1``..``fc1``) is one of its stages."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(self.block3(self.block2(self.block1(x)))))
