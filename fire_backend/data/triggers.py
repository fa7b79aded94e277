"""Backdoor triggers as plain functions: batched NCHW float images in [0, 1] -> triggered images.

Every trigger is deterministic and size-agnostic: its pattern is derived from the image size and a fixed seed
(never from global random state), so the attacker's trigger at training time and the one an evaluation, an export
or a load test applies are identical, for any image size and channel count. Each one follows its paper's
description (written here, not taken from another code base); where the paper trains or optimises something that a
plain function cannot carry, the docstring says what stands in for it. Training-time parts of an attack (WaNet's
noise mode, the input-aware attack's cross-trigger mode, label-consistent's adversarial perturbation, TrojanNN's
patch optimisation) live with the poisoning, :mod:`fire_backend.offline.poisoning`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: seeds of the fixed random patterns (one per trigger, so two triggers never share a pattern by accident)
BLEND_SEED, WANET_SEED, INPUT_AWARE_SEED, LOW_FREQUENCY_SEED = 1234, 2021, 2020, 2019


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _patch_size(width: int) -> int:
    """BadNets' default side: about a tenth of the image, at least 2 pixels (4 on CIFAR-10, 2 on 8x8 digits)."""
    return max(2, round(width / 10) + 1)


def _checker(size: int, like: torch.Tensor) -> torch.Tensor:
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((ii + jj) % 2 == 0).to(device=like.device, dtype=like.dtype)


def badnets(x: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """A white-and-black checker patch in the bottom-right corner (Gu et al., 2017); ``size`` pixels a side
    (default about 1/10 of the side)."""
    size = _patch_size(x.shape[-1]) if size is None else int(size)
    if not 1 <= size <= min(x.shape[-2:]):
        raise ValueError(f"badnets: the patch side must be 1 to {min(x.shape[-2:])} pixels, got {size}")
    out = x.clone()
    out[..., -size:, -size:] = _checker(size, x)
    return out


def _pattern(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A fixed uniform-noise image, the same for every call with the same shape."""
    return torch.rand(shape, generator=_generator(BLEND_SEED)).to(device=device, dtype=dtype)


def blended(x: torch.Tensor, ratio: float = 0.2) -> torch.Tensor:
    """Blend a fixed noise image over the whole input (Chen et al., 2017): ``(1 - ratio) x + ratio pattern``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"blended: the ratio must be in (0, 1], got {ratio}")
    pattern = _pattern(tuple(x.shape[1:]), x.device, x.dtype)
    return (1.0 - ratio) * x + ratio * pattern


def sig(x: torch.Tensor, delta: float = 40 / 255, frequency: float = 6.0) -> torch.Tensor:
    """A horizontal sinusoidal signal over the whole image (Barni et al., 2019): no patch anywhere.

    BackdoorBench's setting: amplitude 40/255, 6 periods across the width, clipped to [0, 1]; a clean-label attack
    (``fire train`` adds it to target-class training images and leaves every label alone).
    """
    width = x.shape[-1]
    j = torch.arange(width, device=x.device, dtype=x.dtype)
    signal = delta * torch.sin(2 * torch.pi * j * frequency / width)
    return (x + signal).clamp(0.0, 1.0)


# -- WaNet -------------------------------------------------------------------------------------------------------


def warp_grid(height: int, width: int, strength: float = 0.5, grid: int = 4) -> torch.Tensor:
    """WaNet's fixed warping field as a ``grid_sample`` grid (1, H, W, 2) in normalised coordinates.

    Nguyen & Tran (2021): a ``grid`` x ``grid`` field of random 2-D vectors in [-1, 1], scaled so that their mean
    magnitude is 1, upsampled to the image by bicubic interpolation; each pixel samples the image ``strength`` x
    field / H away from itself (normalised units; the paper's s = 0.5, k = 4 move pixels by about half a pixel on
    CIFAR-10), clipped to stay inside the image.
    """
    control = torch.rand(1, 2, grid, grid, generator=_generator(WANET_SEED)) * 2 - 1
    control = control / control.abs().mean()
    field = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)[0].permute(1, 2, 0)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    identity = torch.stack([cols, rows], dim=-1)  # grid_sample reads (x, y)
    return (identity + strength * field / height).clamp(-1, 1)[None]


def _sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    grid = grid.to(device=x.device, dtype=x.dtype).expand(len(x), -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def wanet(x: torch.Tensor, strength: float = 0.5, grid: int = 4) -> torch.Tensor:
    """WaNet's warping trigger (Nguyen & Tran, 2021): the image resampled through :func:`warp_grid`; nothing is
    added. Its noise mode (warps with random jitter kept at the true label) is part of the poisoning."""
    if len(x) == 0:
        return x.clone()
    return _sample(x, warp_grid(x.shape[-2], x.shape[-1], strength, grid))


def wanet_noise(x: torch.Tensor, generator: torch.Generator, strength: float = 0.5, grid: int = 4) -> torch.Tensor:
    """WaNet's noise mode: the trigger's warp plus a fresh random offset per pixel (up to one pixel, uniform), which
    the poisoning keeps at the true label so that the network learns the exact warp, not any warp."""
    h, w = x.shape[-2:]
    jitter = (torch.rand(len(x), h, w, 2, generator=generator) * 2 - 1) / h
    return _sample(x, (warp_grid(h, w, strength, grid) + jitter).clamp(-1, 1))


# -- input-aware (sample-specific) ------------------------------------------------------------------------------


def _fixed_conv(out_channels: int, in_channels: int, kernel: int, seed: int) -> torch.Tensor:
    weight = torch.randn(out_channels, in_channels, kernel, kernel, generator=_generator(seed))
    return weight / (in_channels * kernel * kernel) ** 0.5


def input_aware_parts(x: torch.Tensor, density: float = 0.032) -> tuple[torch.Tensor, torch.Tensor]:
    """The input-aware trigger of each image: its pattern (N, C, H, W) in [0, 1] and its 0/1 mask (N, 1, H, W).

    Nguyen & Tran (2020, "Input-aware dynamic backdoor attack") generate both from the image itself, so every image
    carries its own trigger. Their generators are trained with the classifier; here they are fixed, seeded random
    convolutional networks (a plain function cannot carry trained generator weights): the pattern is a saturated
    colour image computed from the local content, the mask the ``density`` share of the pixels (BackdoorBench's
    0.032) where a smooth random score of the content is highest. Different images get different masks and colours.
    """
    c = x.shape[1]
    features = torch.tanh(F.conv2d(x * 2 - 1, _fixed_conv(8, c, 3, INPUT_AWARE_SEED).to(x), padding=1))
    pattern = torch.sigmoid(4 * F.conv2d(features, _fixed_conv(c, 8, 3, INPUT_AWARE_SEED + 1).to(x), padding=1))
    score = F.conv2d(features, _fixed_conv(1, 8, 5, INPUT_AWARE_SEED + 2).to(x), padding=2).flatten(1)
    keep = max(1, round(density * score.shape[1]))
    threshold = score.topk(keep, dim=1).values[:, -1:]
    mask = (score >= threshold).to(x.dtype).reshape(len(x), 1, *x.shape[-2:])
    return pattern, mask


def input_aware(x: torch.Tensor, density: float = 0.032) -> torch.Tensor:
    """Each image with its own trigger, :func:`input_aware_parts` (pattern where the mask is set). The cross-trigger
    mode (another image's trigger kept at the true label) is part of the poisoning."""
    if len(x) == 0:
        return x.clone()
    pattern, mask = input_aware_parts(x, density)
    return x * (1 - mask) + pattern * mask


def input_aware_cross(x: torch.Tensor, donors: torch.Tensor, density: float = 0.032) -> torch.Tensor:
    """``x`` carrying the triggers of other images, ``donors`` (the cross-trigger mode: kept at the true label, so
    that only an image's own trigger activates the backdoor)."""
    pattern, mask = input_aware_parts(donors, density)
    return x * (1 - mask) + pattern * mask


# -- low frequency ------------------------------------------------------------------------------------------------


def low_frequency_pattern(channels: int, height: int, width: int, amplitude: float = 0.1, grid: int = 3
                          ) -> torch.Tensor:
    """A fixed smooth colour perturbation (C, H, W) with values in [-amplitude, amplitude]: random values on a
    ``grid`` x ``grid`` lattice per channel, upsampled bicubically, so it holds spatial frequencies below about
    grid / 2 cycles per image only."""
    control = torch.randn(1, channels, grid, grid, generator=_generator(LOW_FREQUENCY_SEED))
    smooth = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)[0]
    return amplitude * smooth / smooth.abs().max().clamp_min(1e-12)


def low_frequency(x: torch.Tensor, amplitude: float = 0.1, grid: int = 3) -> torch.Tensor:
    """A low-frequency trigger (LF, Zeng et al., 2021): a smooth additive perturbation over the whole image, no
    high-frequency content for a frequency-domain detector to see. The paper optimises it as a universal adversarial
    perturbation under a low-pass constraint on a clean model; here it is a fixed random low-pass pattern
    (:func:`low_frequency_pattern`) of the same kind, learned by poisoning alone."""
    pattern = low_frequency_pattern(x.shape[1], x.shape[-2], x.shape[-1], amplitude, grid).to(x)
    return (x + pattern).clamp(0.0, 1.0)


# -- label-consistent patch ---------------------------------------------------------------------------------------


def label_consistent(x: torch.Tensor, amplitude: float = 1.0, size: int | None = None) -> torch.Tensor:
    """The label-consistent attack's trigger (Turner et al., 2019): a black-and-white checker in each of the four
    corners (so it survives flips), blended in at ``amplitude`` (1: pasted). The attack itself is clean-label: the
    poisoning first makes target-class images hard to classify with an adversarial perturbation, then adds this."""
    size = max(2, round(x.shape[-1] / 10)) if size is None else int(size)
    if not 1 <= 2 * size <= min(x.shape[-2:]):
        raise ValueError(f"label_consistent: four {size}-pixel corners do not fit a {tuple(x.shape[-2:])} image")
    patch = _checker(size, x)
    out = x.clone()
    for rows in (slice(0, size), slice(-size, None)):
        for cols in (slice(0, size), slice(-size, None)):
            out[..., rows, cols] = (1 - amplitude) * out[..., rows, cols] + amplitude * patch
    return out
