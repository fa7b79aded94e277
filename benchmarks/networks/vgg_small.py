"""A small VGG-style CIFAR-10 classifier: 3 x 3 convolutions with BatchNorm and in-place ReLUs in one ``features``
sequence, max-pools between resolutions, an average pool and a ``classifier`` sequence (as torchvision's VGG is
laid out, eight times narrower). Takes FP32 NCHW images in [0, 1]."""

from __future__ import annotations

import torch
from torch import nn

LAYOUT = (32, 32, "M", 64, 64, "M", 128, 128, "M")


class SmallVGG(nn.Module):
    def __init__(self, num_classes: int = 10, layout: tuple = LAYOUT) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.BatchNorm2d(int(item)),
                           nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(channels, 128), nn.ReLU(inplace=True), nn.Dropout(0.3),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build(num_classes: int = 10) -> SmallVGG:
    return SmallVGG(num_classes)
