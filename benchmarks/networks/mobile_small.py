"""A small MobileNetV3-style CIFAR-10 classifier: inverted-residual bottlenecks (1 x 1 expansion, depthwise
convolution, squeeze-and-excitation where marked, 1 x 1 projection, a residual add where the shape allows), hard-swish
in the later ones, a last 1 x 1 convolution, an average pool and a two-layer ``classifier``. Takes FP32 NCHW images
in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: kernel, expanded, out, squeeze-and-excitation, hard-swish, stride (32 x 32 in: 32, 16, 8, 4)
BOTTLENECKS = ((3, 32, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
               (5, 96, 40, True, True, 2), (5, 120, 40, True, True, 1), (3, 160, 64, True, True, 2),
               (3, 192, 64, True, True, 1))


def conv_unit(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
              activation: type[nn.Module] | None = nn.Hardswish) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


class Excite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(8, channels // 4), 1)
        self.expand = nn.Conv2d(max(8, channels // 4), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, hswish: bool, stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        self.expand = conv_unit(cin, expanded, 1, activation=act)
        self.depthwise = conv_unit(expanded, expanded, kernel, stride, groups=expanded, activation=act)
        self.excite = Excite(expanded) if se else nn.Identity()
        self.project = conv_unit(expanded, cout, 1, activation=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.excite(self.depthwise(self.expand(x))))
        return out + x if self.residual else out


class SmallMobileNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_unit(3, 16, 3)]
        channels = 16
        for kernel, expanded, cout, se, hswish, stride in BOTTLENECKS:
            layers.append(Bottleneck(channels, kernel, expanded, cout, se, hswish, stride))
            channels = cout
        layers.append(conv_unit(channels, 256, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(256, 256), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def build(num_classes: int = 10) -> SmallMobileNet:
    return SmallMobileNet(num_classes)
