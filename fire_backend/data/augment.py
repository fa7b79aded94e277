"""Image augmentations that break a trigger but keep the object: shrink-and-pad and the ShrinkPad defence.

ShrinkPad (Li et al., 2021) is the offline baseline ``fire eval`` compares against; the same shrink-and-pad at
the four corners gives the augmentation-guided estimator its pseudo-clean twins, offline and in the control
endpoint alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def shrink_pad(x: torch.Tensor, pad: int, top: int, left: int) -> torch.Tensor:
    """Shrink the image by ``pad`` pixels per side-pair and place it at (top, left) on black."""
    h, w = x.shape[-2:]
    small = torch.nn.functional.interpolate(x, size=(h - pad, w - pad), mode="bilinear", align_corners=False)
    out = torch.zeros_like(x)
    out[..., top : top + h - pad, left : left + w - pad] = small
    return out


def default_pad(size: int) -> int:
    return max(1, size // 8)


def shrinkpad_defense(x: torch.Tensor, pad: int | None = None, seed: int = 0) -> torch.Tensor:
    """The ShrinkPad baseline (Li et al., 2021): shrink, then pad at a random offset per image."""
    pad = default_pad(x.shape[-1]) if pad is None else pad
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, pad + 1, (len(x), 2), generator=generator)
    return torch.cat([shrink_pad(x[i : i + 1], pad, int(t), int(s)) for i, (t, s) in enumerate(offsets)])


def trigger_breaking_augmentations(size: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Shrink-and-pad at the four corners: the pseudo-clean twins of the augmentation-guided estimator."""
    pad = default_pad(size)
    return [
        (lambda x, t=t, s=s: shrink_pad(x, pad, t, s)) for t, s in ((0, 0), (0, pad), (pad, 0), (pad, pad))
    ]
