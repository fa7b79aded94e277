"""PreActResNet18 with BackdoorBench's parameter names, so its checkpoints load without renaming.

Written from the published architecture (He et al., "Identity Mappings in Deep Residual Networks");
the attribute names (conv1, layer1..layer4 with bn1/conv1/bn2/conv2/shortcut.0, avgpool, linear)
follow BackdoorBench's ``models/preact_resnet.py`` so ``load_state_dict`` matches key for key.
``width`` scales every stage (64 is the standard network) so a narrow copy trains on a CPU.
``mean``/``std`` (optional) standardize the [0, 1] input inside the first convolution, for weights
trained on normalized images (BackdoorBench's pipeline); they are not part of the state dict.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fire_backend.models.blocks import first_conv


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        skip = self.shortcut(pre) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + skip


class PreActResNet18(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        width: int = 64,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = first_conv(mean, std, in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        planes = [width, 2 * width, 4 * width, 8 * width]
        in_planes = width
        for index, (p, stride) in enumerate(zip(planes, [1, 2, 2, 2], strict=True)):
            blocks = nn.Sequential(PreActBlock(in_planes, p, stride), PreActBlock(p, p, 1))
            setattr(self, f"layer{index + 1}", blocks)
            in_planes = p
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.avgpool(out)
        return self.linear(out.view(out.size(0), -1))
