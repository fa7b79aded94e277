"""The clean/poisoned traffic mix a Locust process sends, and which protocol its --host names."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from fire_backend.wire.endpoints import url_scheme
from fire_backend.wire.images import load_digits, load_npz

LOGGER = logging.getLogger("fire.loadtest")


@dataclass(frozen=True)
class Pool:
    kind: str  # "clean" or "poisoned"
    x: np.ndarray  # float32 NCHW in [0, 1]
    y: np.ndarray  # true labels


class Traffic:
    """The clean and poisoned pools of one process, and the mix: each request is all clean or all poisoned."""

    def __init__(self, clean: Pool | None, poisoned: Pool | None, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"--poison-ratio must be in [0, 1], got {ratio}")
        if clean is None and poisoned is None:
            raise ValueError("no images: pass --clean-npz and/or --poisoned-npz")
        if poisoned is None and ratio > 0:
            LOGGER.warning("no --poisoned-npz: sending clean traffic only (PA/ASR need poisoned images)")
            ratio = 0.0
        if clean is None and ratio < 1:
            LOGGER.warning("no clean images: sending poisoned traffic only")
            ratio = 1.0
        self.clean, self.poisoned, self.ratio = clean, poisoned, ratio

    def draw(self, rng: np.random.Generator, batch: int) -> tuple[str, np.ndarray, np.ndarray]:
        """(kind, images, true labels) of one request of ``batch`` images."""
        pool = self.poisoned if rng.random() < self.ratio else self.clean
        idx = rng.integers(0, len(pool.y), size=batch)
        return pool.kind, pool.x[idx], pool.y[idx]


def load_pool(kind: str, path: str) -> Pool | None:
    """Images of one kind from an .npz (``fire data export``); without a file, clean means the embedded digits."""
    if path:
        images = load_npz(path)
    elif kind == "clean":
        images = load_digits()
    else:
        return None
    if images.y is None:
        raise ValueError(f"{path}: no labels 'y' (needed for CA/PA/ASR); write it with `fire data export`")
    return Pool(kind, images.model_input(), images.y)


_TRAFFIC: dict[tuple, Traffic] = {}
_TRAFFIC_LOCK = threading.Lock()  # a gevent lock once Locust has monkey-patched threading


def traffic_for(options) -> Traffic:
    """This process's traffic for the parsed options, loaded once and shared by all its users."""
    key = (options.clean_npz, options.poisoned_npz, options.poison_ratio)
    with _TRAFFIC_LOCK:
        if key not in _TRAFFIC:
            _TRAFFIC[key] = Traffic(load_pool("clean", options.clean_npz), load_pool("poisoned", options.poisoned_npz),
                                    options.poison_ratio)
        return _TRAFFIC[key]


def host_protocol(host: str | None, protocol: str = "auto") -> str:
    """Which protocol --host and --protocol select: the URL scheme wins; a bare HOST:PORT is gRPC unless told."""
    scheme = url_scheme(host)
    if scheme is not None:
        return scheme
    return "grpc" if protocol in ("auto", "", None) else protocol
