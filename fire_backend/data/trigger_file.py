"""``trigger:PATH`` attacks: a pattern and a mask kept in a file, pasted onto every image.

For triggers that are optimised rather than written down (TrojanNN's patch, optimised by ``fire train --attack
trojannn`` against a clean copy of the model and saved beside the checkpoint), and for any fixed trigger a user
has as an image. The file is an ``.npz`` with ``pattern`` (C, H, W) and ``mask`` (1 or C, H, W), float values in
[0, 1]; the trigger is ``x (1 - mask) + pattern mask``, with both resized to the image (bilinear) and a 3-channel
pattern turned to luminance for 1-channel images, so it is size-agnostic like the built-in triggers.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fire_backend.data.datasets import read_arrays

#: attack-name prefix of a trigger file: ``trigger:/abs/path/trigger.npz``
TRIGGER_PREFIX = "trigger:"
LUMINANCE = (0.299, 0.587, 0.114)


def write_trigger(path: Path, pattern: np.ndarray, mask: np.ndarray) -> None:
    """Save a trigger file (see the module docstring); a ValueError for shapes or values it cannot hold."""
    pattern, mask = np.asarray(pattern, dtype=np.float32), np.asarray(mask, dtype=np.float32)
    _check(path, pattern, mask)
    np.savez_compressed(path, pattern=pattern, mask=mask)
    _trigger.cache_clear()


def _check(path: Path, pattern: np.ndarray, mask: np.ndarray) -> None:
    if pattern.ndim != 3 or mask.ndim != 3 or mask.shape[1:] != pattern.shape[1:] or mask.shape[0] not in (
            1, pattern.shape[0]):
        raise ValueError(f"{path}: a trigger file needs pattern (C, H, W) and mask (1 or C, H, W) of one size, got "
                         f"{pattern.shape} and {mask.shape}")
    for name, values in (("pattern", pattern), ("mask", mask)):
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise ValueError(f"{path}: the {name} must hold finite values in [0, 1]")


class FileTrigger:
    """The trigger of one file, applied to batches of any size (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        arrays = read_arrays(path, ("pattern", "mask"), "trigger file (pattern, mask)")
        pattern, mask = arrays["pattern"].astype(np.float32), arrays["mask"].astype(np.float32)
        _check(path, pattern, mask)
        self.path, self.pattern, self.mask = path, torch.from_numpy(pattern), torch.from_numpy(mask)
        self.__name__ = f"{TRIGGER_PREFIX}{path}"

    def _fit(self, tensor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``tensor`` (C, H, W) resized to ``x``'s images and its channels matched (luminance, or broadcast)."""
        channels = x.shape[1]
        if tensor.shape[0] == 3 and channels == 1:
            tensor = sum(w * tensor[i] for i, w in enumerate(LUMINANCE))[None]
        elif tensor.shape[0] not in (1, channels):
            raise ValueError(f"{self.path}: a {tensor.shape[0]}-channel trigger cannot go onto {channels}-channel "
                             "images")
        if tensor.shape[-2:] != x.shape[-2:]:
            tensor = F.interpolate(tensor[None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0]
        return tensor.to(device=x.device, dtype=x.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pattern, mask = self._fit(self.pattern, x), self._fit(self.mask, x)
        return x * (1 - mask) + pattern * mask

    def __repr__(self) -> str:
        return f"FileTrigger({str(self.path)!r})"


@functools.lru_cache(maxsize=8)
def _trigger(path: str) -> FileTrigger:
    return FileTrigger(Path(path))


def file_trigger(path: str | Path) -> FileTrigger:
    """The ``trigger:PATH`` trigger (cached per file)."""
    return _trigger(str(Path(path).expanduser().resolve()))
