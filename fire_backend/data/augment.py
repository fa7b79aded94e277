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


def gaussian_blur(x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """A separable Gaussian blur (reflect padding); ``sigma`` defaults to the side / 32 pixels, at least 0.5 (1 pixel
    on CIFAR-10): it removes fine patterns and high-frequency signals but keeps the object."""
    sigma = max(0.5, x.shape[-1] / 32) if sigma is None else sigma
    radius = max(1, int(round(2 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    rows = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    cols = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 0, radius, radius), mode="reflect"), rows, groups=c)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (radius, radius, 0, 0), mode="reflect"), cols,
                                      groups=c)


def _dct_matrix(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    k = torch.arange(size, dtype=torch.float64)
    basis = torch.cos(torch.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * size)) * (2.0 / size) ** 0.5
    basis[0] /= 2.0 ** 0.5
    return basis.to(device=device, dtype=dtype)


def jpeg_like(x: torch.Tensor, keep: int = 3, block: int = 8) -> torch.Tensor:
    """JPEG's lossy step, simplified: per ``block`` x ``block`` tile (the image zero-padded to whole tiles) keep the
    DCT coefficients of the lowest ``keep`` x ``keep`` frequencies and drop the rest; what JPEG at low quality does
    to fine patterns and high-frequency signals."""
    n, c, h, w = x.shape
    block = min(block, h, w)
    ph, pw = -h % block, -w % block
    tiles = torch.nn.functional.pad(x, (0, pw, 0, ph)).unfold(2, block, block).unfold(3, block, block)
    d = _dct_matrix(block, x.dtype, x.device)
    coefficients = d @ tiles @ d.T
    low = torch.zeros(block, block, dtype=x.dtype, device=x.device)
    low[:keep, :keep] = 1.0
    restored = d.T @ (coefficients * low) @ d  # (n, c, H/b, W/b, b, b)
    out = restored.permute(0, 1, 2, 4, 3, 5).reshape(n, c, h + ph, w + pw)
    return out[..., :h, :w].clamp(0.0, 1.0)


def center_crop(x: torch.Tensor, share: float = 0.75) -> torch.Tensor:
    """The central ``share`` of the image (each side), resized back to full size: drops what sits at the border
    (corner patches) and rescales the rest."""
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * share)), max(1, round(w * share))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    return torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)


#: the twins the label-free ranking compares a repaired prediction with (fire_backend.multilayer)
TWINS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "shrinkpad": lambda x: shrink_pad(x, default_pad(x.shape[-1]), default_pad(x.shape[-1]) // 2,
                                      default_pad(x.shape[-1]) // 2),
    "blur": gaussian_blur,
    "jpeg": jpeg_like,
    "crop": center_crop,
}
