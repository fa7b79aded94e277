"""Push -> served: how long a direction version committed through one replica takes to be served by every replica.

"Served" is what a client sees: an answer of ``fire_ensemble`` whose DIRECTION_VERSION names the new version (or a
later one). The clock starts just before the push is sent, so a sample is the control round trip, the commit, the
propagation and the recompile together. Used by the multi-replica test and ``benchmarks/etcd_propagation.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from fire_backend.wire.client import FireClient
from fire_backend.wire.control import ControlClient


class NotServed(AssertionError):
    """A replica did not serve the pushed version in time."""


def served_after(client: FireClient, version: int, start: float, timeout_s: float, image: np.ndarray) -> float:
    """Seconds from ``start`` (a perf_counter time) until ``client``'s replica answers with ``version`` or later."""
    while True:
        result = client.infer(image)
        now = time.perf_counter()
        if result.versions is not None and int(result.versions[0]) >= version:
            return now - start
        if now - start > timeout_s:
            raise NotServed(f"{client.url} still serves version {result.versions} {timeout_s:g} s after a push of "
                            f"version {version}")


@dataclass(frozen=True)
class Propagation:
    """One push: its version, push -> acknowledged seconds, and push -> served seconds on each replica."""

    version: int
    ack_s: float
    served_s: list[float]


def push_and_wait(control: ControlClient, directions: list[dict[str, Any]], replicas: Sequence[FireClient],
                  pool: ThreadPoolExecutor, image: np.ndarray, timeout_s: float = 10.0) -> Propagation:
    """Push ``directions`` through ``control`` and wait until every replica serves the new version."""
    start = time.perf_counter()
    version = int(control.push(directions)["version"])
    ack = time.perf_counter() - start
    waits = [pool.submit(served_after, client, version, start, timeout_s, image) for client in replicas]
    return Propagation(version, ack, [w.result() for w in waits])


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]
