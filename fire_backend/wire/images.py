"""Images as the server takes them: loading (.npz from `fire data export`, PNG files, the embedded digits test
split) and the uint8 NHWC -> float32 NCHW / 255 conversion.

numpy (and PIL for PNGs) only: no torch, so Locust workers stay small.
"""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fire_backend.defaults import cache_dir, digits_split, evaluation_indices


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC (or one HWC image) -> float32 NCHW in [0, 1]; float NCHW (or one CHW image) passes through.

    Float input must already be in [0, 1] (the server's input contract).
    """
    x = np.asarray(images)
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"uint8 images must be N x H x W x C, got shape {x.shape}")
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be uint8 NHWC or float NCHW in [0, 1], got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"float images must be N x C x H x W, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
        raise ValueError("float images must be finite and in [0, 1] (uint8 images are divided by 255 for you)")
    return x


@dataclass(frozen=True)
class Images:
    """uint8 N x H x W x C images with optional true labels and poisoned flags."""

    x: np.ndarray
    y: np.ndarray | None = None
    poisoned: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.x)

    def head(self, n: int | None) -> Images:
        if n is None:
            return self
        cut = slice(0, n)
        return Images(self.x[cut], None if self.y is None else self.y[cut],
                      None if self.poisoned is None else self.poisoned[cut], self.source)

    def model_input(self) -> np.ndarray:
        return to_model_input(self.x)


def open_npz(path: Path | str, what: str = "FIRE image file (x, as `fire data export` writes)"
             ) -> np.lib.npyio.NpzFile:
    """``np.load`` of an .npz archive (nothing unpickled), for ``with``; anything else (a text file, an .npy, a
    damaged archive) is a ValueError naming the file and ``what`` it should have been, not numpy's bare message."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not an .npz archive of named arrays (as np.savez writes), so not a {what}; "
                         f"numpy: {exc}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: one bare array (.npy), not an .npz archive of named arrays, so not a {what}")
    return data


def load_npz(path: Path | str) -> Images:
    """x (uint8 NHWC), optional y and poisoned, as ``fire data export`` writes them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .npz file (write one with `fire data export`)")
    with open_npz(path) as data:
        if "x" not in data.files:
            raise ValueError(f"{path}: no array 'x' (has {sorted(data.files)}); write one with `fire data export`")
        x = data["x"]
        y = data["y"].astype(np.int64) if "y" in data.files else None
        poisoned = data["poisoned"].astype(bool) if "poisoned" in data.files else None
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"{path}: x must be uint8 N x H x W x C, got {x.dtype} {x.shape}")
    for name, arr in (("y", y), ("poisoned", poisoned)):
        if arr is not None and arr.shape != (len(x),):
            raise ValueError(f"{path}: {name} must have shape ({len(x)},), got {arr.shape}")
    return Images(x, y, poisoned, str(path))


def load_pngs(paths: Sequence[Path | str]) -> Images:
    """PNG (or any PIL-readable) files of one size -> uint8 NHWC: grayscale stays 1 channel, alpha is dropped."""
    from PIL import Image

    if not paths:
        raise ValueError("no image files given")
    arrays = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such image file")
        with Image.open(path) as img:
            mode = "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
            arr = np.asarray(img.convert(mode), dtype=np.uint8)
        arrays.append(arr[..., None] if arr.ndim == 2 else arr)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images differ in size/channels {sorted(shapes)}: resize them to the model's input first")
    source = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return Images(np.stack(arrays), source=source)


@functools.lru_cache(maxsize=1)
def _digits_test_split() -> tuple[np.ndarray, np.ndarray]:
    """The digits test split, cached as .npz per scikit-learn version (importing scikit-learn takes seconds,
    which would stall a Locust worker's event loop)."""
    import os
    from importlib.metadata import version

    cache = cache_dir() / f"digits-test-sklearn-{version('scikit-learn')}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as data:
                return _frozen(data["x"]), _frozen(data["y"])
        except (OSError, ValueError, KeyError):
            pass  # damaged: recompute
    _, _, x_test, y_test = digits_split()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, x=x_test, y=y_test)
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only cache: fine, just slower next time
    return _frozen(x_test), _frozen(y_test)


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    arr.flags.writeable = False
    return arr


def load_digits(n: int | None = None) -> Images:
    """The embedded 8x8 digits test split (scikit-learn) without the defender's reserve, as uint8 NHWC: its first
    ``n`` evaluation images in the split's class-stratified draw order (the images `fire eval` evaluates)."""
    x_test, y_test = _digits_test_split()  # shared, read-only
    index = evaluation_indices(y_test)
    if n is not None and not 1 <= n <= len(index):
        raise ValueError(f"the digits test split has {len(index)} images besides the defender's reserve, "
                         f"asked for {n}")
    index = index[:n]
    return Images(x_test[index], y_test[index], np.zeros(len(index), bool), "digits (test split)")
