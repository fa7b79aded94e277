"""What the repair stages say of the direction store, for ``fire serve``'s ``/ready``: read from their gauges.

Every repairing stage instance exports ``fire_store_degraded`` (it cannot read or verify the store's live version
and keeps serving the one it verified) and ``fire_repair_unavailable`` (it never verified one and refuses requests),
and the control stage its own ``fire_store_degraded``, on Triton's ``/metrics`` (:mod:`fire_backend.metric_families`).
They travel over the stubs' IPC, so no store access and no disk write is needed to know them, whatever the store
(file or etcd) and whatever state it is in. This reads them back, at most once per ``max_age_s`` however often the
probes ask; a scrape that fails says the state is unknown and changes nothing.

``/ready`` is 503 while any repair instance is unavailable (a replica started while the store was unreachable:
traffic goes to the others); a degraded store alone keeps it at 200 (every instance serves its verified version,
and a load balancer that drained every replica sharing the store would turn a store fault into an outage), with
``store.degraded`` in the body.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from typing import Any

from fire_backend.metric_families import INSTANCE_LABEL, MODEL_LABEL, REPAIR_UNAVAILABLE, STORE_DEGRADED

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)")
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')


def store_gauges(page: str) -> dict[str, list[str]]:
    """From a /metrics page: the processes (``model/model_instance``) reporting a degraded store, and the repair
    instances reporting themselves unavailable."""
    found: dict[str, list[str]] = {STORE_DEGRADED.name: [], REPAIR_UNAVAILABLE.name: []}
    for line in page.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match["name"] not in found:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        if value >= 1:
            labels = {m["key"]: m["value"] for m in _LABEL.finditer(match["labels"])}
            found[match["name"]].append(f"{labels.get(MODEL_LABEL, '?')}/{labels.get(INSTANCE_LABEL, '?')}")
    return {name: sorted(set(who)) for name, who in found.items()}


class StoreHealth:
    """The store as the stages of one server see it (``snapshot()``), from the metrics page at ``metrics_url``."""

    def __init__(self, metrics_url: str, max_age_s: float = 1.0, timeout_s: float = 1.0) -> None:
        self.metrics_url = metrics_url
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def snapshot(self) -> dict[str, Any]:
        """``known`` (the page was read), ``degraded`` (some process sees a damaged or unreachable store),
        ``degraded_in`` and ``unavailable`` (``model/model_instance`` of each)."""
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < self.max_age_s:
                return self._cached[1]
            try:
                with self._opener.open(self.metrics_url, timeout=self.timeout_s) as response:
                    page = response.read().decode("utf-8", "replace")
            except (OSError, ValueError) as exc:
                state: dict[str, Any] = {"known": False, "error": str(exc), "degraded": False, "degraded_in": [],
                                         "unavailable": []}
            else:
                gauges = store_gauges(page)
                degraded, unavailable = gauges[STORE_DEGRADED.name], gauges[REPAIR_UNAVAILABLE.name]
                state = {"known": True, "degraded": bool(degraded or unavailable), "degraded_in": degraded,
                         "unavailable": unavailable}
            self._cached = (time.monotonic(), state)
            return state
