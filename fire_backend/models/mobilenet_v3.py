"""MobileNetV3-Large under the parameter names BackdoorBench's ``mobilenet_v3_large`` saves.

Written from the published architecture (Howard et al., "Searching for MobileNetV3", Table 1: the large
network's fifteen bottlenecks). BackdoorBench builds torchvision's network, so the names follow its layout:
``features.0`` is the stem (convolution ``.0``, BatchNorm ``.1``, hard-swish), ``features.1``..``features.15`` the
inverted-residual bottlenecks, each a ``block`` of conv-norm-activation units (expansion when it widens, then the
depthwise convolution, a squeeze-and-excitation unit with ``fc1``/``fc2`` where the paper has one, then the
projection), ``features.16`` the last 1 x 1 convolution, then ``classifier.0`` and ``classifier.3``. BatchNorm
uses eps 0.001 as that network does. ``mean``/``std`` standardize the [0, 1] input inside the first convolution.
No torchvision needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fire_backend.models.blocks import first_conv

#: per bottleneck: kernel, expanded channels, output channels, squeeze-and-excitation, hard-swish (else ReLU), stride
BOTTLENECKS: tuple[tuple[int, int, int, bool, bool, int], ...] = (
    (3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
    (5, 72, 40, True, False, 2), (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
    (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1), (3, 184, 80, False, True, 1),
    (3, 184, 80, False, True, 1), (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
    (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1), (5, 960, 160, True, True, 1),
)
STEM, LAST_CONV, HIDDEN = 16, 960, 1280
BN_EPS, BN_MOMENTUM = 0.001, 0.01


def round_channels(value: float, divisor: int = 8) -> int:
    """Channels rounded to the nearest multiple of ``divisor``, never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvNormActivation(nn.Sequential):
    """Convolution (no bias), BatchNorm, then the activation if any: names ``.0`` and ``.1``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 activation: type[nn.Module] | None = nn.Hardswish, conv: nn.Conv2d | None = None) -> None:
        layers: list[nn.Module] = [conv or nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups,
                                                     bias=False),
                                   nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel gates from the pooled features: x * hardsigmoid(fc2(relu(fc1(mean(x)))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = round_channels(channels // 4)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return x * F.hardsigmoid(scale)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, hardswish: bool,
                 stride: int) -> None:
        super().__init__()
        activation = nn.Hardswish if hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, activation=activation))
        layers.append(ConvNormActivation(expanded, expanded, kernel, stride, groups=expanded, activation=activation))
        if se:
            layers.append(SqueezeExcitation(expanded))
        layers.append(ConvNormActivation(expanded, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class MobileNetV3Large(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, dropout: float = 0.2) -> None:
        super().__init__()
        stem = first_conv(mean, std, in_channels, STEM, kernel_size=3, stride=2, padding=1, bias=False)
        layers: list[nn.Module] = [ConvNormActivation(in_channels, STEM, 3, 2, conv=stem)]
        channels = STEM
        for kernel, expanded, cout, se, hardswish, stride in BOTTLENECKS:
            layers.append(InvertedResidual(channels, kernel, expanded, cout, se, hardswish, stride))
            channels = cout
        layers.append(ConvNormActivation(channels, LAST_CONV, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(LAST_CONV, HIDDEN), nn.Hardswish(inplace=True),
                                        nn.Dropout(dropout, inplace=True), nn.Linear(HIDDEN, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
