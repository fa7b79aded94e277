"""VGG19 with batch normalization, under the parameter names BackdoorBench's ``vgg19_bn`` saves.

Written from the published architecture (Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", configuration E, with a BatchNorm after each convolution). BackdoorBench builds torchvision's
network, so the names follow its layout: ``features.N`` numbers every layer of the convolutional part in order
(convolution, BatchNorm, ReLU per convolution; a max-pool after each group), ``classifier.0``, ``.3``, ``.6`` are
the three linear layers, after a 7 x 7 adaptive average pool (on 32 x 32 CIFAR images the 1 x 1 feature map is
repeated 49 times, as BackdoorBench trains it). ``mean``/``std`` standardize the [0, 1] input inside the first
convolution (not part of the state dict). No torchvision needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fire_backend.models.blocks import first_conv

#: configuration E: output channels of each 3 x 3 convolution, "M" for a 2 x 2 max-pool
LAYOUT_E: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                                   512, 512, 512, 512, "M")


class VGG19BN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in LAYOUT_E:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = int(item)
            conv = first_conv(mean, std, channels, out, kernel_size=3, padding=1) if not layers else \
                nn.Conv2d(channels, out, kernel_size=3, padding=1)
            layers += [conv, nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
