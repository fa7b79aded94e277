"""Triggers of this project's own making, for attacks the library does not ship (``fire train --attack
triggers:<name>`` with ``benchmarks`` on PYTHONPATH). Used by the CIFAR-10 runs of issue 16 in RESULTS.md."""

from __future__ import annotations

import torch


def corner_star(x: torch.Tensor) -> torch.Tensor:
    """A 5x5 two-colour plus sign (red arms on a cyan square) in the top-left corner, one pixel in from the edge.

    Unlike BadNets' black-and-white checker (bottom-right), it is coloured, elsewhere and not a checker: a patch
    trigger the ranking and the estimators have never been tuned on. Grayscale inputs get the luminance.
    """
    out = x.clone()
    size, at = 5, 1
    cyan = torch.tensor([0.0, 1.0, 1.0], dtype=x.dtype, device=x.device)
    red = torch.tensor([1.0, 0.0, 0.0], dtype=x.dtype, device=x.device)
    patch = cyan.view(3, 1, 1).repeat(1, size, size)
    patch[:, size // 2, :] = red.view(3, 1)
    patch[:, :, size // 2] = red.view(3, 1)
    if x.shape[-3] != 3:
        patch = (0.299 * patch[0] + 0.587 * patch[1] + 0.114 * patch[2]).expand(x.shape[-3], size, size)
    out[..., at:at + size, at:at + size] = patch
    return out
