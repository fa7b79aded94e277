"""Image data sets as uint8 NHWC arrays, loaded from the package or a local path, never downloaded."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fire_backend.defaults import digits_split
from fire_backend.wire.images import open_npz


@dataclass(frozen=True)
class Dataset:
    """A train/test pair of uint8 images (N, H, W, C) with integer labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-sample tensor shape as served: C, H, W."""
        _, h, w, c = self.x_train.shape
        return (c, h, w)

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        if which not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {which!r}")
        return (self.x_train, self.y_train) if which == "train" else (self.x_test, self.y_test)


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1], the serving input format."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [0, 1] -> uint8 NHWC, for export."""
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _check_images(name: str, x: np.ndarray, y: np.ndarray) -> None:
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"{name}: images must be uint8 N x H x W x C, got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{name}: labels must be a vector of length {len(x)}, got shape {y.shape}")


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits, scaled to uint8, with a fixed stratified split."""
    return Dataset("digits", *digits_split())


def read_arrays(path: Path, names: Sequence[str], what: str = ".npz file") -> dict[str, np.ndarray]:
    """The named arrays of an .npz (nothing unpickled); errors name the file and what it should have been."""
    with open_npz(path, what) as data:
        missing = set(names) - set(data.files)
        if missing:
            raise ValueError(f"{path}: not a {what}: missing arrays {sorted(missing)} (has {sorted(data.files)})")
        return {k: data[k] for k in names}


def load_npz(path: Path) -> Dataset:
    """Arrays x_train/y_train/x_test/y_test (uint8 NHWC), as in the shared CIFAR-10 file."""
    arrays = read_arrays(path, ("x_train", "y_train", "x_test", "y_test"), "data set file (x_train, y_train, x_test, "
                         "y_test)")
    for part in ("train", "test"):
        _check_images(f"{path}:{part}", arrays[f"x_{part}"], arrays[f"y_{part}"])
    return Dataset(
        f"npz:{path}",
        arrays["x_train"],
        arrays["y_train"].astype(np.int64),
        arrays["x_test"],
        arrays["y_test"].astype(np.int64),
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as handle:
        # The official CIFAR-10 python batches are pickles of plain dicts of arrays and lists.
        batch = pickle.load(handle, encoding="bytes")
    x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), np.asarray(batch[b"labels"], dtype=np.int64)


def load_cifar10_folder(path: Path) -> Dataset:
    """The standard ``cifar-10-batches-py`` folder (data_batch_1..5, test_batch)."""
    files = [path / f"data_batch_{i}" for i in range(1, 6)] + [path / "test_batch"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: not a cifar-10-batches-py folder (missing {', '.join(missing)})")
    parts = [_read_cifar_batch(f) for f in files]
    x_train = np.concatenate([p[0] for p in parts[:5]])
    y_train = np.concatenate([p[1] for p in parts[:5]])
    return Dataset(f"cifar10:{path}", x_train, y_train, parts[5][0], parts[5][1])


def load_dataset(spec: str) -> Dataset:
    """``digits`` | ``cifar10:PATH`` (batches folder or .npz) | ``npz:PATH``."""
    if spec == "digits":
        return load_digits()
    kind, _, raw = spec.partition(":")
    if not raw:
        raise ValueError(f"unknown data set {spec!r}: use digits, cifar10:PATH or npz:PATH")
    path = Path(raw).expanduser()
    if kind == "npz":
        return load_npz(path)
    if kind == "cifar10":
        return load_npz(path) if path.suffix == ".npz" else load_cifar10_folder(path)
    raise ValueError(f"unknown data set kind {kind!r}: use digits, cifar10:PATH or npz:PATH")
