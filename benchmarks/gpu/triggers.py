"""The trigger of the shared full-size BadNets model (``shared/models/README.md``), as a ``module:function``
attack: a 3x3 white patch in the bottom-right corner, every channel. The GPU check uses it so that no stored set
of poisoned images has to travel; ``bundle.py`` checks it against the stored set before it packs anything."""

from __future__ import annotations

import torch


def shared_badnets(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] NCHW images with the patch (white is 1.0, which is 255 once stored as uint8)."""
    out = x.clone()
    out[..., -3:, -3:] = 1.0
    return out
