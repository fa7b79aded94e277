"""ResMix: a CIFAR-10 classifier of our own design, to show FIRE on a network it was not written for.

Not a ResNet: each ``mix`` unit runs two branches side by side (a 3 x 3 convolution and a dilated one), joins
them with a 1 x 1 ``fuse`` convolution and adds the unit's input back (a residual add in ``forward``, through a
strided ``shortcut`` where the shape changes). Activations, pooling and the final flatten are functional calls in
``forward``; module names are its own (``entry``, ``tier1``..``tier3``, ``mix0``/``mix1``, ``fuse``, ``decide``).
Takes FP32 NCHW images in [0, 1] and normalizes them itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


class Mix(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        self.near = nn.Conv2d(cin, half, 3, stride, 1, bias=False)
        self.far = nn.Conv2d(cin, cout - half, 3, stride, 2, dilation=2, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        self.fuse = nn.Conv2d(cout, cout, 1, bias=False)
        self.fuse_norm = nn.BatchNorm2d(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = F.gelu(self.norm(torch.cat([self.near(x), self.far(x)], dim=1)))
        out = self.fuse_norm(self.fuse(both))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class Tier(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.mix0 = Mix(cin, cout, stride)
        self.mix1 = Mix(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix1(self.mix0(x))


class ResMix(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1), persistent=False)
        self.entry = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.entry_norm = nn.BatchNorm2d(width)
        self.tier1 = Tier(width, width, 1)
        self.tier2 = Tier(width, 2 * width, 2)
        self.tier3 = Tier(2 * width, 4 * width, 2)
        self.decide = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.entry_norm(self.entry((x - self.mean) / self.std)))
        x = self.tier3(self.tier2(self.tier1(x)))
        return self.decide(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(num_classes: int = 10, width: int = 32) -> ResMix:
    return ResMix(num_classes, width)
