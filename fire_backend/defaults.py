"""Constants and paths shared by the library and the torch-free client side (Locust workers import this).

Nothing here imports torch; scikit-learn is imported only when the digits arrays are built.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: the embedded digits data set's fixed stratified split
DIGITS_TEST_SIZE = 600
DIGITS_SPLIT_SEED = 0
#: the first RESERVE test images are the defender's (clean set, flagged samples); evaluation uses the rest
RESERVE = 200


def cache_dir() -> Path:
    """Where trained demo models and other derived files are cached (FIRE_BACKEND_CACHE_DIR overrides)."""
    base = os.environ.get("FIRE_BACKEND_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"), "fire-backend"
    )
    return Path(base)


def demo_checkpoint_dir() -> Path:
    """Where the embedded demo's BadNets digits model is cached (``benchmarks/step_load.sh`` reads it too)."""
    return cache_dir() / "demo" / "checkpoint"


def demo_repository_dir() -> Path:
    """Where the embedded demo's repository is cached (``fire serve`` and ``fire bench`` without --repository)."""
    return cache_dir() / "demo" / "repository"


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as uint8 N x 8 x 8 x 1: x_train, y_train, x_test, y_test."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    return x_tr, y_tr, x_te, y_te
