"""The networks FIRE knows by name: the demo's digits CNN, and BackdoorBench's architectures under its parameter
names (PreActResNet18, VGG19-BN, MobileNetV3-Large), so their attack results load without renaming or torchvision.

Any other network comes in as the user's own (:mod:`fire_backend.models.user`); every network, these included, runs
through :class:`fire_backend.models.network.Network`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fire_backend.defaults import ARCHITECTURE_NAMES
from fire_backend.models.digits_cnn import DigitsCNN
from fire_backend.models.mobilenet_v3 import MobileNetV3Large
from fire_backend.models.preact_resnet import PreActResNet18
from fire_backend.models.vgg import VGG19BN

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = dict(
    zip(ARCHITECTURE_NAMES, (DigitsCNN, PreActResNet18, VGG19BN, MobileNetV3Large), strict=True))


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Instantiate a supported architecture by name (the name stored in checkpoints)."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {arch!r}; supported: {supported}") from None
    return factory(**kwargs)


__all__ = ["ARCHITECTURES", "VGG19BN", "DigitsCNN", "MobileNetV3Large", "PreActResNet18", "build_model"]
