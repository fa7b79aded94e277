"""A user-supplied trigger for tests: `fire_test_triggers:stripes` (with tests/unit on sys.path)."""

from __future__ import annotations

import torch

NOT_CALLABLE = 42


def stripes(x: torch.Tensor) -> torch.Tensor:
    """Every other row of the top quarter set to white."""
    out = x.clone()
    rows = max(1, x.shape[-2] // 4)
    out[..., 0:rows:2, :] = 1.0
    return out


#: images passed to `counted` since the last reset (what a build or an export read through the attack)
SEEN = {"images": 0}


def counted(x: torch.Tensor) -> torch.Tensor:
    """`stripes`, counting the images it is asked to poison."""
    SEEN["images"] += len(x)
    return stripes(x)
