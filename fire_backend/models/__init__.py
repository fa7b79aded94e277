"""Reference networks whose forward pass is an explicit chain of named stages.

Every model here exposes ``stages()``: the ordered (name, module) pairs whose composition is the
forward pass. Splitting at a stage boundary is then exact by construction, which is what FIRE needs
to repair a latent in the middle of a network served as separate Triton stages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fire_backend.models.digits_cnn import DigitsCNN
from fire_backend.models.preact_resnet import PreActResNet18

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "preact_resnet18": PreActResNet18,
}


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Instantiate a supported architecture by name (the name stored in checkpoints)."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {arch!r}; supported: {supported}") from None
    return factory(**kwargs)


__all__ = ["ARCHITECTURES", "DigitsCNN", "PreActResNet18", "build_model"]
